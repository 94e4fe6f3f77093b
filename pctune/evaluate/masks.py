"""Object masks for the ``explain`` stage and the IoU of a Grad-CAM map against them.

ImageNet-S (Gao et al.) ships one PNG per validation image whose class id at each pixel is
``R + 256 * G``: 0 is background, 1000 is "ignore" (pixels the annotators left out), anything else an
ImageNet-S category (a line of its categories file, counted from 1). Masks are matched to the val
images by file name (the stem: ``ILSVRC2012_val_00000001.JPEG`` <- ``ILSVRC2012_val_00000001.png``,
anywhere under the folder), must have their image file's size (``mask_resize = true`` resizes them to it,
nearest-neighbour) and go through the images' own resize + centre crop, nearest-neighbour.
The demo has no such masks: a digit's object is its own ink (pixels above a threshold).

Threshold rule (the paper does not state one): the CAM is upsampled bilinearly to the image size,
min-max normalised per image, and the pixels at or above ``cam_threshold`` (default 0.5) form its
region; IoU is taken against the object mask over the pixels that are not "ignore". An all-zero CAM
(no positive evidence) has an empty region.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pctune.errors import PctuneError

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


def cam_regions(cams: Tensor, size: Sequence[int], threshold: float) -> tuple[Tensor, Tensor]:
    """(maps [N, H, W] in [0, 1], regions [N, H, W] bool) of layer CAMs ``[N, 1, h, w]`` by the rule above."""
    up = F.interpolate(cams.detach().float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    low = up.flatten(1).min(1).values.view(-1, 1, 1)
    span = up.flatten(1).max(1).values.view(-1, 1, 1) - low
    maps = torch.where(span > 0, (up - low) / span.clamp_min(1e-12), torch.zeros_like(up))
    return maps, (maps >= threshold) & (span > 0)


def iou(regions: Tensor, objects: Tensor, valid: Tensor) -> Tensor:
    """Per-image intersection over union of two boolean maps over the valid pixels; 0 when both are
    empty there."""
    r, o = regions & valid, objects & valid
    inter = (r & o).flatten(1).sum(1).double()
    union = (r | o).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))
