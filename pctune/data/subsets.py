"""A fixed, seeded subset of an ImageNet-style validation folder, loaded into memory once."""

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


def load_val_subset(root: str | Path, num_images: int, seed: int, image_size: int = 224,
                    workers: int = 0) -> tuple[Tensor, Tensor]:
    """(images [N, C, H, W] normalized with the standard val transform, labels [N]) of a fixed subset
    of the ImageFolder at ``root``."""
    dataset = image_folder(root, split="val", image_size=image_size)
    indices = subset_indices(len(dataset), num_images, seed)
    subset = torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(subset, batch_size=64, shuffle=False, num_workers=workers)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)
