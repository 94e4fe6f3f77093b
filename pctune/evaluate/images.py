"""Clean evaluation images for the promotion stages: pixels in [0, 1] with the model's normalization
kept beside them (attacks work in pixel space), and an ImageNet-style folder of the same images (the
corruption stage reads files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pctune.data.classes import ModelClasses
from pctune.data.subsets import load_val_subset, seeded_subset
from pctune.errors import PctuneError


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
    """The clean images of ``source`` ("digits" or an ImageNet-style val folder at ``path``): all of
    them, or the seeded subset of ``num_images`` (:func:`pctune.data.subsets.seeded_subset`); a folder's
    class folders labelled by the model's ``classes`` (:func:`pctune.data.classes.map_classes`)."""
    if source == "digits":
        from pctune.data.demo import digits, digits_folder, digits_normalization

        pixels, labels = digits("test", image_size=input_size[-1], normalize=False)
        keep = seeded_subset(len(labels), num_images, seed)
        mean, std = digits_normalization()
        return Images(pixels[keep], labels[keep], [mean], [std], digits_folder(input_size[-1]), crop=False)
    from pctune.data.folders import IMAGENET_MEAN, IMAGENET_STD

    if not path or not Path(path).is_dir():
        raise PctuneError(f"{path}: no such image folder")
    pixels, labels = load_val_subset(path, num_images, seed, input_size[-1], workers, normalize=False, classes=classes)
    return Images(pixels, labels, list(IMAGENET_MEAN), list(IMAGENET_STD), Path(path), crop=True, classes=classes)
