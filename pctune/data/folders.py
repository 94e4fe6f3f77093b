"""ImageNet-style folders (``root/<class>/<image>``) with the standard train/val transforms."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from torch import Tensor
from torchvision import datasets, transforms

from pctune.data.classes import ModelClasses, map_classes
from pctune.errors import PctuneError
from pctune.utils import first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def standard_transform(split: str, image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       normalize: bool = True):
    """torchvision's usual recipe: train = random resized crop + flip; val = resize to 256/224 of
    the crop, centre crop. ``normalize=False``: pixels in [0, 1]."""
    if split == "train":
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    elif split == "val":
        steps = [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
    else:
        raise PctuneError(f"split must be 'train' or 'val', got {split!r}")
    steps.append(transforms.ToTensor())
    if normalize:
        steps.append(transforms.Normalize(mean, std))
    return transforms.Compose(steps)


def image_folder(root: str | Path, split: str = "val", image_size: int = 224, grayscale: bool = False,
                 normalize: bool = True, classes: ModelClasses | None = None):
    """An ``ImageFolder`` over ``root`` with the standard transform, its class folders labelled by
    :func:`class_indices` for the model's ``classes``; a clear error when the folder is missing or holds
    no images."""
    root = Path(root)
    transform = standard_transform(split, image_size, normalize=normalize)
    if grayscale:
        transform = transforms.Compose([transforms.Grayscale(3), transform])
    index = class_indices(root, classes or ModelClasses())
    try:
        return _LabelledFolder(str(root), index, transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise PctuneError(f"{root}: not an image folder ({first_line(exc)})") from exc


class _LabelledFolder(datasets.ImageFolder):
    """An ImageFolder whose class folders are labelled by a given mapping (the model's indices)."""

    def __init__(self, root: str, index: dict[str, int], **kwargs) -> None:
        self._index = dict(index)
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return sorted(self._index), dict(self._index)


def class_indices(root: str | Path, classes: ModelClasses) -> dict[str, int]:
    """The model's output index of each class folder of ``root`` (:func:`pctune.data.classes.map_classes`)."""
    return map_classes(folder_classes(root), classes, str(root))


def folder_classes(root: str | Path) -> list[str]:
    """The class folders of an ImageNet-style folder, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise PctuneError(f"{root}: no such directory")
    try:
        return datasets.folder.find_classes(str(root))[0]
    except FileNotFoundError as exc:
        raise PctuneError(f"{root}: not an image folder ({first_line(exc)})") from exc


def readable_batches(loader, paths: Sequence[str]) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
    """The batches of a loader whose dataset yields ``(image, label, ok)`` (``ok`` False for a file that
    could not be decoded, with a blank image), as ``(images, labels, unreadable paths)`` with the
    unreadable ones left out; ``paths`` are the dataset's files, in its order."""
    position = 0
    for x, y, ok in loader:
        unreadable = [paths[position + j] for j in (~ok).nonzero().flatten().tolist()]
        position += len(y)
        yield x[ok], y[ok], unreadable
