"""Clean evaluation images, for the promotion stages and the search objectives that measure as a stage
does (``cam_iou``): pixels in [0, 1] with the model's normalization kept beside them (attacks work in
pixel space), and an ImageNet-style folder of the same images (the corruption stage reads files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pctune.data.classes import ModelClasses
from pctune.data.sources import data_source


@dataclass
class Images:
    pixels: torch.Tensor
    labels: torch.Tensor
    mean: list[float]
    std: list[float]
    folder: Path
    crop: bool  # the folder's images are resized and centre-cropped (ImageNet's recipe), not just resized
    classes: ModelClasses | None = None  # how the folder's class folders were labelled (the model's classes)

    def normalized(self) -> torch.Tensor:
        return (self.pixels - torch.tensor(self.mean).view(1, -1, 1, 1)) / torch.tensor(self.std).view(1, -1, 1, 1)


def clean_images(source: str, path: str | None, input_size: tuple[int, int, int], num_images: int | None = None,
                 seed: int = 0, workers: int = 0, classes: ModelClasses | None = None) -> Images:
    """The clean images of the data source ``source`` (:data:`pctune.data.sources.DATA_SOURCES`: "digits", or
    an ImageNet-style val folder at ``path``): all of them, or the seeded subset of ``num_images``
    (:func:`pctune.data.subsets.seeded_subset`); a folder's class folders labelled by the model's ``classes``
    (:func:`pctune.data.classes.map_classes`)."""
    data = data_source(source)
    labelled_by = None if data.own_classes else classes
    pixels, labels = data.subset(path, num_images, seed, input_size[-1], workers, classes=labelled_by, normalize=False)
    mean, std = data.normalization()
    # a folder's images are resized and centre-cropped (ImageNet's recipe); the digits only resized
    return Images(pixels, labels, mean, std, data.folder(path, input_size[-1]), crop=data.reads_folder,
                  classes=labelled_by)
