"""The fixed, seeded subset of an image set: one rule for the search, the promotion stages and the
generated ImageNet-C (asking for more images than there are is an error, never a silent cap)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from pctune.data.classes import ModelClasses
from pctune.data.folders import image_folder
from pctune.errors import PctuneError
from pctune.utils import first_line


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
                    workers: int = 0, normalize: bool = True, unreadable: list[str] | None = None,
                    classes: ModelClasses | None = None) -> tuple[Tensor, Tensor]:
    """(images [N, C, H, W] with the standard val transform, labels [N]) of a fixed subset of the
    ImageFolder at ``root`` (all of it for ``num_images=None``), labelled by the model's ``classes``
    (:func:`pctune.data.classes.map_classes`); ``normalize=False``: pixels in [0, 1].

    An image that cannot be decoded is an error naming the file and the decoder's reason, unless
    ``unreadable`` is a list: then it is left out and its path appended there."""
    dataset = image_folder(root, split="val", image_size=image_size, normalize=normalize, classes=classes)
    subset = _Decoded(dataset, seeded_subset(len(dataset), num_images, seed), image_size)
    loader = torch.utils.data.DataLoader(subset, batch_size=64, shuffle=False, num_workers=workers)
    paths = [dataset.samples[i][0] for i in subset.indices]
    images, labels, position = [], [], 0
    for x, y, reasons in loader:
        bad = [j for j, reason in enumerate(reasons) if reason]
        if bad and unreadable is None:
            raise PctuneError(f"{paths[position + bad[0]]}: cannot be read as an image ({reasons[bad[0]]})")
        if unreadable is not None:
            unreadable.extend(paths[position + j] for j in bad)
        ok = torch.tensor([not reason for reason in reasons], dtype=torch.bool)
        position += len(y)
        images.append(x[ok])
        labels.append(y[ok])
    if not any(len(y) for y in labels):
        raise PctuneError(f"{root}: none of the {len(paths)} images could be read")
    return torch.cat(images), torch.cat(labels)


class _Decoded(torch.utils.data.Dataset):
    """The images at ``indices`` of an ImageFolder, each with the reason it could not be decoded ("" when it
    could; then a blank image), so that one bad file is reported instead of ending the whole load. The reason
    travels with the item: a loader's worker processes share no state with the caller."""

    def __init__(self, dataset, indices: list[int], image_size: int) -> None:
        self.dataset, self.indices, self.size = dataset, indices, image_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        try:
            x, y = self.dataset[self.indices[i]]
            return x, y, ""
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            blank = torch.zeros(3, self.size, self.size)
            return blank, self.dataset.targets[self.indices[i]], first_line(exc) or "unreadable"
