"""The data sources a job can name (``[data] source``): THE table of them, :data:`DATA_SOURCES`.

Everything that differs between sources is a field or a method of its record: whether it reads a
folder (``data.path``), how its images are normalized, how its labels are found (the digits' own ten
classes, or class folders labelled by the model's class list), whether its objects come with the
images (the digits' ink) or need a mask folder, and how a seeded subset is loaded. Nothing outside
this module compares a source's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from pctune.errors import PctuneError


@dataclass(frozen=True)
class DataSource:
    """One ``data.source``; :class:`Digits` and :class:`ImageFolder` are the two there are."""

    name: str
    description: str
    reads_folder: bool  # data.path names its image folder (required); else data.path is refused
    own_classes: int | None = None  # the labels are the data's own (the digits: 10); None: the model's classes
    own_masks: bool = False  # its objects come with it (the digits' ink); else a mask folder is needed

    def normalization(self) -> tuple[list[float], list[float]]:
        """(mean, std) per channel the images are normalized with."""
        raise NotImplementedError

    def subset(self, path: str | None, num_images: int | None, seed: int, size: int, workers: int = 0,
               unreadable: list[str] | None = None, classes=None, normalize: bool = True) -> tuple[Tensor, Tensor]:
        """The seeded subset of ``num_images`` images (all: None) at ``size``, and their labels."""
        raise NotImplementedError

    def folder(self, path: str | None, size: int) -> Path:
        """The image folder the images come from (the digits: their cached folder)."""
        raise NotImplementedError


class Digits(DataSource):
    def normalization(self) -> tuple[list[float], list[float]]:
        from pctune.data.demo import digits_normalization

        mean, std = digits_normalization()
        return [mean], [std]

    def subset(self, path, num_images, seed, size, workers=0, unreadable=None, classes=None, normalize=True):
        from pctune.data.demo import digits
        from pctune.data.subsets import seeded_subset

        images, labels = digits("test", image_size=size, normalize=normalize)
        keep = seeded_subset(len(labels), num_images, seed)
        return images[keep], labels[keep]

    def folder(self, path, size):
        from pctune.data.demo import digits_folder

        return digits_folder(size)


class ImageFolder(DataSource):
    def normalization(self) -> tuple[list[float], list[float]]:
        from pctune.data.folders import IMAGENET_MEAN, IMAGENET_STD

        return list(IMAGENET_MEAN), list(IMAGENET_STD)

    def subset(self, path, num_images, seed, size, workers=0, unreadable=None, classes=None, normalize=True):
        from pctune.data.subsets import load_val_subset

        if not path or not Path(path).is_dir():
            raise PctuneError(f"{path}: no such image folder")
        return load_val_subset(path, num_images, seed, size, workers, normalize=normalize, unreadable=unreadable,
                               classes=classes)

    def folder(self, path, size):
        return Path(path)


#: ``data.source`` -> its record; in the order the documentation and errors list them
DATA_SOURCES: dict[str, DataSource] = {
    "imagenet-val": ImageFolder("imagenet-val", "an ImageNet-style folder of class folders (data.path)",
                                reads_folder=True),
    "digits": Digits("digits", "the bundled 8x8 digits, upscaled (the demo)", reads_folder=False, own_classes=10,
                     own_masks=True),
}


def data_source(name: str) -> DataSource:
    """The record of ``name`` (checked by job validation; an unknown name here is a KeyError)."""
    return DATA_SOURCES[name]


def source_of(data: str) -> tuple[DataSource, str | None]:
    """What a command line's ``DATA`` argument names: a source without a folder ("digits"), else an
    image folder at that path."""
    found = DATA_SOURCES.get(data)
    if found is not None and not found.reads_folder:
        return found, None
    return DATA_SOURCES["imagenet-val"], data
