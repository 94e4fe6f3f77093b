"""The network as a function of pixels: pixels in [0, 1] -> normalization -> dynamics unrolled to timestep t
(what the adversarial stage attacks and Grad-CAM explains)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import GradMode, PredictiveNet


class Unrolled(nn.Module):
    """``logits(t)`` of ``net`` for pixel images; differentiable with the chosen gradient mode.

    ``grad_mode="exact"`` differentiates through the error-correction term (double backward);
    ``"constant-error"`` treats it as a constant, like the reference package. At t = 0 this is the
    plain backbone.
    """

    def __init__(self, net: PredictiveNet, hparams: Hyperparameters, timestep: int, mean: Sequence[float],
                 std: Sequence[float], grad_mode: GradMode = "exact") -> None:
        super().__init__()
        self.net = net
        self.hparams = hparams
        self.timestep = timestep
        self.grad_mode = grad_mode
        channels = net.input_size[0]
        self.register_buffer("mean", _per_channel(mean, channels))
        self.register_buffer("std", _per_channel(std, channels))

    def forward(self, pixels: Tensor) -> Tensor:
        x = (pixels - self.mean) / self.std
        mode = self.grad_mode if torch.is_grad_enabled() else "none"
        return self.net.run(x, self.timestep, self.hparams, grad_mode=mode)[self.timestep]


def _per_channel(values: Sequence[float] | float, channels: int) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.repeat(channels)
    return t.view(1, channels, 1, 1)
