"""ImageNet-C's corruptions: the catalogue (the 15 standard corruptions, the 4 extra ones, AlexNet's
errors that normalize CE and mCE) and the seeded corruption of one image with ``imagecorruptions``, for
the ``imagenet-c`` promotion stage (its generated source) and the search's corruption conditions.
"""

from __future__ import annotations

import inspect
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@cache
def alexnet() -> dict[str, Any]:
    """The AlexNet reference errors (data file with its source)."""
    with (Path(__file__).parent / "alexnet_errors.toml").open("rb") as fh:
        return tomllib.load(fh)


def standard_corruptions() -> list[str]:
    """The 15 corruptions mCE averages over."""
    return list(alexnet()["standard"])


def extra_corruptions() -> list[str]:
    """The 4 extra corruptions (reported apart)."""
    return list(alexnet()["extra"])


@dataclass(frozen=True)
class CShard:
    """One corruption at one severity: a shard of the ``imagenet-c`` stage, what a corruption condition applies."""

    corruption: str  # or "clean"
    severity: int  # 0 for clean

    @property
    def name(self) -> str:
        return "clean" if self.corruption == "clean" else f"{self.corruption}_s{self.severity}"


MIN_CORRUPT_SIZE = 32  # imagecorruptions refuses smaller images


def corrupt_image(img: Image.Image, shard: CShard, seed: int, index: int) -> Image.Image:
    """The seeded corruption of one image; images under 32 px are corrupted at 32 px and resized back."""
    from imagecorruptions import corrupt

    size = img.size
    if min(size) < MIN_CORRUPT_SIZE:
        img = img.resize((max(size[0], MIN_CORRUPT_SIZE), max(size[1], MIN_CORRUPT_SIZE)), Image.BILINEAR)
    # Most corruptions draw from numpy's global generator: seed it per image, reproducibly. Those that
    # take a `seed` (glass_blur, impulse_noise) would otherwise draw from a fresh unseeded generator.
    image_seed = (seed * 1_000_003 + hash_name(shard.name) * 7_919 + index) % (2**32)
    np.random.seed(image_seed)
    kwargs = {"seed": image_seed} if _takes_seed(shard.corruption) else {}
    out = corrupt(np.asarray(img), corruption_name=shard.corruption, severity=shard.severity, **kwargs)
    out = Image.fromarray(np.uint8(np.clip(out, 0, 255)))
    return out.resize(size, Image.BILINEAR) if out.size != size else out


@cache
def _takes_seed(corruption: str) -> bool:
    from imagecorruptions.corruptions import __dict__ as functions

    return "seed" in inspect.signature(functions[corruption]).parameters


def hash_name(name: str) -> int:
    """A stable (unsalted) small hash of a shard name."""
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name)) % 100_003
