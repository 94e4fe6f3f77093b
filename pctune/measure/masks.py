"""Object masks: which pixels of an image are its object (what a Grad-CAM region is compared with, by
IoU: :mod:`pctune.measure.gradcam`), for the ``explain`` stage and the ``cam_iou`` search objective.

ImageNet-S (Gao et al.) ships one PNG per validation image whose class id at each pixel is
``R + 256 * G``: 0 is background, 1000 is "ignore" (pixels the annotators left out), anything else an
ImageNet-S category (a line of its categories file, counted from 1). Masks are matched to the val
images by file name (the stem: ``ILSVRC2012_val_00000001.JPEG`` <- ``ILSVRC2012_val_00000001.png``,
anywhere under the folder), must have their image file's size (``mask_resize = true`` resizes them to it,
nearest-neighbour) and go through the images' own resize + centre crop, nearest-neighbour.
The demo has no such masks: a digit's object is its own ink (pixels above a threshold).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from pctune.errors import PctuneError
from pctune.measure.images import Images
from pctune.pc.network import PredictiveNet
from pctune.utils import Log

BACKGROUND = 0
IGNORE = 1000


def decode_imagenet_s(path: str | Path) -> np.ndarray:
    """The class id of every pixel of an ImageNet-S mask PNG, ``[H, W]`` int (R + 256 * G)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    except OSError as exc:
        raise PctuneError(f"{path}: cannot be read as an ImageNet-S mask ({exc})") from exc
    return rgb[..., 0] + 256 * rgb[..., 1]


def read_categories(path: str | Path) -> dict[str, int]:
    """wnid -> ImageNet-S class id from its categories file (one wnid per line, ids from 1)."""
    path = Path(path)
    if not path.is_file():
        raise PctuneError(f"{path}: no such categories file")
    wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    return {wnid: i for i, wnid in enumerate(wnids, start=1)}


def object_mask(ids: np.ndarray, class_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(object, valid) boolean maps of a decoded mask: the pixels of ``class_id`` (None: every labelled
    pixel) and the pixels that are not "ignore"."""
    valid = ids != IGNORE
    obj = (ids == class_id) if class_id is not None else valid & (ids != BACKGROUND)
    return obj, valid


def imagenet_s_masks(folder: str | Path, names: Sequence[str], image_size: int,
                     categories: str | Path | None = None, images: str | Path | None = None,
                     resize: bool = False) -> tuple[Tensor, Tensor, list[int]]:
    """(objects [N, S, S] bool, valid [N, S, S] bool, indices of ``names`` that have a mask).

    ``names`` are the images' paths relative to their ImageFolder root ``images`` (``wnid/file``); with a
    ``categories`` file the object is the image's own class, else every labelled pixel. A mask whose size
    differs from its image file's is an error naming it, unless ``resize`` (``mask_resize = true``): then it
    is resized to the image's size first (nearest-neighbour)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PctuneError(f"{folder}: no such mask folder")
    by_stem = {p.stem: p for p in folder.rglob("*.png")}
    classes = read_categories(categories) if categories else None
    objects, valids, found = [], [], []
    for i, name in enumerate(names):
        path = by_stem.get(Path(name).stem)
        if path is None:
            continue
        class_id = None
        if classes is not None:
            wnid = Path(name).parent.name
            if wnid not in classes:
                continue  # a class ImageNet-S does not annotate
            class_id = classes[wnid]
        ids = decode_imagenet_s(path)
        if images is not None:
            ids = _fit_to_image(ids, path, Path(images) / name, resize)
        obj, valid = object_mask(ids, class_id)
        objects.append(_val_geometry(obj, image_size))
        valids.append(_val_geometry(valid, image_size))
        found.append(i)
    if not found:
        raise PctuneError(f"{folder}: no mask matches any of the {len(names)} images by file name")
    return torch.stack(objects), torch.stack(valids), found


def _fit_to_image(ids: np.ndarray, mask: Path, image: Path, resize: bool) -> np.ndarray:
    """A decoded mask at its image file's own size (before any transform): as it is when the sizes agree; an
    error naming the mask when they differ, unless ``resize`` (then nearest-neighbour to the image's size)."""
    from PIL import Image

    try:
        with Image.open(image) as im:
            width, height = im.size
    except OSError as exc:
        raise PctuneError(f"{image}: cannot be read as an image ({exc})") from exc
    if ids.shape == (height, width):
        return ids
    if not resize:
        raise PctuneError(f"{mask}: the mask is {ids.shape[1]}x{ids.shape[0]} but its image {image} is "
                          f"{width}x{height} (width x height); set mask_resize = true in [promotion.explain] "
                          "(pctune evaluate: --set mask_resize=true) to resize masks to their images")
    resized = Image.fromarray(ids.astype(np.int32)).resize((width, height), Image.NEAREST)
    return np.asarray(resized, dtype=np.int64)


def _val_geometry(mask: np.ndarray, image_size: int) -> Tensor:
    """A mask through the val images' resize (short side to 256/224 of the crop) and centre crop,
    nearest-neighbour so that labels stay labels."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    m = torch.from_numpy(mask).unsqueeze(0)
    m = TF.resize(m.to(torch.uint8), [round(image_size * 256 / 224)], interpolation=InterpolationMode.NEAREST)
    return TF.center_crop(m, [image_size, image_size])[0].bool()


def ink_masks(pixels: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """The demo's masks: a digit's ink (any channel above ``threshold`` in [0, 1] pixel space); every
    pixel is valid."""
    obj = (pixels > threshold).any(dim=1)
    return obj, torch.ones_like(obj)


class MaskSettings(Protocol):
    """What :func:`masked_images` reads of its settings (the explain stage's,
    :class:`pctune.evaluate.settings.ExplainSettings`, have these fields)."""

    num_images: int | None
    seed: int
    masks: str | None
    categories: str | None
    mask_resize: bool
    ink_threshold: float


def masked_images(images: Images, settings: MaskSettings, net: PredictiveNet, log: Log):
    """(pixels, labels, objects, valid) of the images that have a mask: the digits' ink, or the
    ImageNet-S masks matched to the val images by file name (``images`` being the seeded subset of
    ``settings.num_images`` from ``settings.seed``). The ``cam_iou`` search objective takes its images here too."""
    if settings.masks is None:
        if images.crop:  # an ImageNet-style folder: ink is no object mask there
            raise PctuneError(f"explain: masks: an ImageNet-S mask folder is needed for the images of {images.folder}")
        return images.pixels, images.labels, *ink_masks(images.pixels, settings.ink_threshold)
    from pctune.data.folders import image_folder
    from pctune.data.subsets import seeded_subset

    samples = image_folder(images.folder, split="val", image_size=net.input_size[-1], classes=images.classes).samples
    names = [str(Path(samples[i][0]).relative_to(images.folder))
             for i in seeded_subset(len(samples), settings.num_images, settings.seed)]
    objects, valid, found = imagenet_s_masks(settings.masks, names, net.input_size[-1], settings.categories,
                                             images=images.folder, resize=settings.mask_resize)
    log(f"explain: {len(found)} of {len(names)} images have a mask in {settings.masks}")
    return images.pixels[found], images.labels[found], objects, valid
