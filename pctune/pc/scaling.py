"""Gradient scaling s_n = K_{n-1} / sqrt(C_n) (paper appendix A.4), computed deterministically.

K_{n-1} is the number of elements of one image's e_{n-1} (the prediction target). C_n is the number
of prediction elements that one element of e_n influences: the decoder's spatial footprint times the
number of predicted channels. The footprint is measured exactly by a structural probe: a one-channel
copy of the decoder whose kernels are all ones, fed a single 1 at the centre of an e_n-sized map, so
every reachable output is strictly positive and nothing can cancel. (The reference package estimates
C by perturbing random inputs of the trained decoder, which depends on the weights and the seed.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pctune.errors import PctuneError

_ACTIVATIONS = (nn.ReLU, nn.SiLU, nn.LeakyReLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout)


def _single_channel(module: nn.Module) -> nn.Module:
    """A one-channel, all-ones copy of ``module`` with the same spatial behaviour."""
    if isinstance(module, nn.Sequential):
        return nn.Sequential(*(_single_channel(m) for m in module))
    if isinstance(module, nn.ConvTranspose2d | nn.Conv2d):
        kwargs = dict(kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                      dilation=module.dilation, bias=False)
        if isinstance(module, nn.ConvTranspose2d):
            probe = nn.ConvTranspose2d(1, 1, output_padding=module.output_padding, **kwargs)
        else:
            probe = nn.Conv2d(1, 1, padding_mode=module.padding_mode, **kwargs)
        nn.init.ones_(probe.weight)
        return probe
    if isinstance(module, nn.Upsample):
        return nn.Upsample(size=module.size, scale_factor=module.scale_factor, mode=module.mode,
                           align_corners=module.align_corners)
    if isinstance(module, _ACTIVATIONS):
        return nn.Identity()  # the probe's values are positive: these keep them non-zero
    raise PctuneError(
        f"gradient scaling cannot measure the footprint of decoder layer {type(module).__name__}; "
        "supported: Sequential, Conv2d, ConvTranspose2d, Upsample and activations"
    )


@torch.no_grad()
def footprint(decoder: nn.Module, rep_shape: tuple[int, ...], target_channels: int) -> int:
    """C_n: prediction elements influenced by the centre element of a representation of ``rep_shape``
    (C, H, W)."""
    probe = _single_channel(decoder).double()
    _, height, width = rep_shape
    x = torch.zeros(1, 1, height, width, dtype=torch.float64)
    x[0, 0, height // 2, width // 2] = 1.0
    spatial = int((probe(x) > 0).sum())
    return spatial * target_channels


def gradient_scale(decoder: nn.Module, rep_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> float:
    """s_n = K_{n-1} / sqrt(C_n) for one image's representation and target shapes."""
    k = math.prod(target_shape)
    c = footprint(decoder, rep_shape, target_shape[0])
    return k / math.sqrt(c)
