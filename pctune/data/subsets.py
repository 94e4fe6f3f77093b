"""The fixed, seeded subset of an image set: one rule for the search, the promotion stages and the
generated ImageNet-C (asking for more images than there are is an error, never a silent cap)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from pctune.data.folders import image_folder
from pctune.errors import PctuneError


def subset_indices(total: int, num_images: int, seed: int) -> list[int]:
    """``num_images`` distinct indices out of ``total``, drawn from ``seed`` and sorted (the same
    subset on every machine for the same folder listing)."""
    if num_images <= 0:
        raise PctuneError(f"num_images must be > 0, got {num_images}")
    if num_images > total:
        raise PctuneError(f"asked for {num_images} images but the folder holds only {total}")
    gen = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(total, generator=gen)[:num_images].tolist())


def seeded_subset(total: int, num_images: int | None, seed: int) -> list[int]:
    """:func:`subset_indices`, or every index when ``num_images`` is None."""
    return list(range(total)) if num_images is None else subset_indices(total, num_images, seed)


def load_val_subset(root: str | Path, num_images: int | None, seed: int, image_size: int = 224,
                    workers: int = 0, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """(images [N, C, H, W] with the standard val transform, labels [N]) of a fixed subset of the
    ImageFolder at ``root`` (all of it for ``num_images=None``); ``normalize=False``: pixels in [0, 1]."""
    dataset = image_folder(root, split="val", image_size=image_size, normalize=normalize)
    subset = torch.utils.data.Subset(dataset, seeded_subset(len(dataset), num_images, seed))
    loader = torch.utils.data.DataLoader(subset, batch_size=64, shuffle=False, num_workers=workers)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)
