"""ImageNet-style folders (``root/<class>/<image>``) with the standard train/val transforms."""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets, transforms

from pctune.errors import PctuneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def standard_transform(split: str, image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """torchvision's usual recipe: train = random resized crop + flip; val = resize to 256/224 of
    the crop, centre crop."""
    normalize = transforms.Normalize(mean, std)
    if split == "train":
        return transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    if split == "val":
        resize = round(image_size * 256 / 224)
        return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                                   transforms.ToTensor(), normalize])
    raise PctuneError(f"split must be 'train' or 'val', got {split!r}")


def image_folder(root: str | Path, split: str = "val", image_size: int = 224, grayscale: bool = False):
    """An ``ImageFolder`` over ``root`` with the standard transform; a clear error when the folder is
    missing or holds no images."""
    root = Path(root)
    if not root.is_dir():
        raise PctuneError(f"{root}: no such directory")
    transform = standard_transform(split, image_size)
    if grayscale:
        transform = transforms.Compose([transforms.Grayscale(3), transform])
    try:
        return datasets.ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise PctuneError(f"{root}: not an image folder ({exc})") from None
