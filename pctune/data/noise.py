"""Additive Gaussian noise drawn once from a seed, so every trial sees the same noisy images."""

from __future__ import annotations

import torch
from torch import Tensor

from pctune.errors import PctuneError


def add_gaussian_noise(images: Tensor, sigma: float, seed: int) -> Tensor:
    """``images + sigma * N(0, 1)``, the noise drawn on the CPU from ``seed`` (independent of the
    device, the batch size and the global RNG). ``images`` are in normalized space."""
    if sigma < 0:
        raise PctuneError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return images.clone()
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(images.shape, generator=gen, dtype=torch.float32)
    return images + (sigma * noise).to(images.dtype)
