"""Grad-CAM IoU over timesteps (Choksi et al., ESANN 2025): does the evidence move toward the object?

For an image and a timestep t, Captum's ``LayerGradCam`` explains the network unrolled to t
(:class:`pctune.measure.unrolled.Unrolled`, the model the adversarial stage attacks) for the
ground-truth class at the model's ``cam_layer``: a hook on the network's tap
(:attr:`pctune.pc.network.PredictiveNet.cam_tap`) sees that pcoder's representation at t, the one the
logits of t are computed from. The map is thresholded and compared with the object mask
(:mod:`pctune.measure.masks`) by IoU. The ``explain`` promotion stage and the ``cam_iou`` search
objective both measure with :func:`timestep_ious`.

Threshold rule (the paper does not state one): the CAM is upsampled bilinearly to the image size,
min-max normalised per image, and the pixels at or above ``cam_threshold`` (default 0.5) form its
region; IoU is taken against the object mask over the pixels that are not "ignore". An all-zero CAM
(no positive evidence) has an empty region.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pctune.measure.unrolled import Unrolled
from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet


@dataclass
class ExplainPayload:
    """What Grad-CAM measures: the network, its configuration, the images with their masks and how to
    explain them (the explain stage sends it once through the Ray object store to its shards)."""

    net: PredictiveNet
    hparams: Hyperparameters
    pixels: Tensor  # [N, C, H, W] in [0, 1]
    labels: Tensor
    objects: Tensor  # [N, H, W] bool
    valid: Tensor  # [N, H, W] bool: not "ignore"
    mean: Sequence[float]
    std: Sequence[float]
    timesteps: int
    cam_threshold: float = 0.5
    grad_mode: str = "exact"
    seed: int = 0


def layer_cams(payload: ExplainPayload, x: Tensor, labels: Tensor, timestep: int) -> Tensor:
    """Grad-CAM ``[N, 1, h, w]`` (ReLU applied) of the network unrolled to ``timestep`` at its cam layer."""
    from captum.attr import LayerGradCam

    net = payload.net
    model = Unrolled(net, payload.hparams, timestep, payload.mean, payload.std, payload.grad_mode).eval()
    device = next(net.parameters()).device
    cams = LayerGradCam(model.to(device), net.cam_tap).attribute(x.to(device), target=labels.to(device),
                                                                 relu_attributions=True)
    return cams.detach().cpu()


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


def timestep_ious(payload: ExplainPayload, x: Tensor, labels: Tensor, objects: Tensor, valid: Tensor,
                  timesteps: Iterable[int]) -> dict[int, Tensor]:
    """IoU per image of the thresholded CAM at each of ``timesteps`` against the masks: the one rule of
    the explain stage and of the search objective ``cam_iou``."""
    return {t: iou(cam_regions(layer_cams(payload, x, labels, t), x.shape[-2:], payload.cam_threshold)[1],
                   objects, valid) for t in timesteps}
