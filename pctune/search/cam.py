"""What a trial of ``objective.kind = "cam_iou"`` measures (the objective itself:
:class:`pctune.search.objectives.cam_iou.CamIou`): where the network looks, as a score to maximize.

A trial scores its configuration as the paper's objective does (the same fixed noisy images at
``objective.sigma``, the cross-entropy still reported), then explains the network unrolled to t = 0
and t = T (``cam_timesteps = "last"``) or to every t = 0..T (``"mean"``) with Grad-CAM for the true
class and takes the IoU of the thresholded map against the image's object mask, with the explain
stage's own functions (:func:`pctune.measure.gradcam.timestep_ious`) and settings
(``[objective.cam]``, else ``[promotion.explain]``: ``masks``, ``categories``, ``ink_threshold``,
``cam_threshold``, ``grad_mode``), so the search and the promotion stage measure the same thing. Reported:

- ``cam_iou``: the objective: mean IoU over the images at t = T, or averaged over t = 1..T;
- ``cam_iou_t{t}`` for the timesteps explained (always t = 0, the feedforward map);
- ``cam_iou_rel``: ``cam_iou`` / ``cam_iou_t0``, the ESANN study's IoU(T) / IoU(0);
- ``cam_seconds``: the time Grad-CAM took.

A trial whose dynamics diverged gets ``cam_iou = 0`` (the worst IoU) and no maps; it never ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from pctune.measure.gradcam import ExplainPayload, timestep_ious
from pctune.metrics import CAM_IOU, CAM_IOU_REL, at_timestep
from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet


@dataclass(frozen=True)
class CamObjective:
    """What a trial of a ``cam_iou`` search needs besides the images and masks."""

    timesteps: str = "last"  # objective.cam_timesteps: "last" | "mean"
    threshold: float = 0.5  # [promotion.explain] cam_threshold
    grad_mode: str = "exact"  # [promotion.explain] grad_mode

    def steps(self, horizon: int) -> list[int]:
        """The timesteps to explain: t = 0 and T, or every t = 0..T."""
        return [0, horizon] if self.timesteps == "last" else list(range(horizon + 1))


def cam_metrics(net: PredictiveNet, hparams: Hyperparameters, data: dict[str, torch.Tensor], cam: CamObjective,
                horizon: int, batch_size: int, diverged: bool) -> dict[str, float]:
    """The ``cam_iou`` metrics of ``hparams`` on ``data`` (``images``: normalized and noisy, ``labels``,
    ``objects`` and ``valid``: the masks), ``horizon`` = T."""
    if diverged:
        return {CAM_IOU: 0.0}
    began = time.perf_counter()
    images, labels = data["images"], data["labels"]
    objects, valid = data["objects"].cpu(), data["valid"].cpu()
    # the images are normalized already: the unrolled network's own normalization is the identity
    payload = ExplainPayload(net, hparams, images, labels, objects, valid, [0.0], [1.0], horizon,
                             cam.threshold, cam.grad_mode)
    steps = cam.steps(horizon)
    sums = dict.fromkeys(steps, 0.0)
    for i in range(0, len(labels), batch_size):
        j = min(i + batch_size, len(labels))
        ious = timestep_ious(payload, images[i:j], labels[i:j], objects[i:j], valid[i:j], steps)
        for t, values in ious.items():
            sums[t] += float(values.sum())
    per_t = {t: total / max(len(labels), 1) for t, total in sums.items()}
    value = per_t[horizon] if cam.timesteps == "last" else sum(per_t[t] for t in steps[1:]) / horizon
    metrics = {at_timestep(CAM_IOU, t): v for t, v in per_t.items()}
    metrics.update({CAM_IOU: value, CAM_IOU_REL: value / per_t[0] if per_t[0] > 0 else math.nan,
                    "cam_seconds": time.perf_counter() - began})
    return metrics
