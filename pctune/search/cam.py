"""The search objective ``objective.kind = "cam_iou"``: where the network looks, as a score to maximize.

A trial scores its configuration as the paper's objective does (the same fixed noisy images at
``objective.sigma``, the cross-entropy still reported), then explains the network unrolled to t = 0
and t = T (``cam_timesteps = "last"``) or to every t = 0..T (``"mean"``) with Grad-CAM for the true
class and takes the IoU of the thresholded map against the image's object mask, with the explain
stage's own functions (:func:`pctune.evaluate.explain.timestep_ious`) and settings
(``[promotion.explain]``: ``masks``, ``categories``, ``ink_threshold``, ``cam_threshold``,
``grad_mode``), so the search and the promotion stage measure the same thing. Reported:

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

from pctune.evaluate.explain import ExplainPayload, timestep_ious
from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet
from pctune.schema import error


@dataclass(frozen=True)
class CamObjective:
    """What a trial of a ``cam_iou`` search needs besides the images and masks."""

    timesteps: str = "last"  # objective.cam_timesteps: "last" | "mean"
    threshold: float = 0.5  # [promotion.explain] cam_threshold
    grad_mode: str = "exact"  # [promotion.explain] grad_mode

    def steps(self, horizon: int) -> list[int]:
        """The timesteps to explain: t = 0 and T, or every t = 0..T."""
        return [0, horizon] if self.timesteps == "last" else list(range(horizon + 1))


def cam_objective(job) -> CamObjective | None:
    """A job's ``cam_iou`` settings: the objective's timesteps, the explain stage's threshold and
    gradients (None: the objective is the cross-entropy)."""
    if job.objective.kind != "cam_iou":
        return None
    explain = job.promotion.settings["explain"]
    return CamObjective(job.objective.cam_timesteps, explain.cam_threshold, explain.grad_mode)


def check_cam_objective(job, source: str) -> None:
    """What ``objective.kind = "cam_iou"`` asks of a job: one condition, every trial scored once on
    every image (no early stopping on a running score), and object masks for its images."""
    if job.objective.kind != "cam_iou":
        return
    kind = "objective.kind = 'cam_iou'"
    if job.objective.conditions:
        raise error(source, "objective.conditions", f"{kind} scores one condition (objective.sigma); robust "
                    "conditions, constraints and Pareto searches take objective.kind = 'cross_entropy'")
    if job.search.scheduler != "fifo":
        raise error(source, "search.scheduler", f"{kind} needs 'fifo' (asha and hyperband stop trials on a "
                    "running cross-entropy; the IoU is scored once, on every image)")
    if job.data.source != "digits" and job.promotion.settings["explain"].masks is None:
        raise error(source, "promotion.explain.masks", f"{kind} on an image folder needs the ImageNet-S mask "
                    "folder (the digits' objects are their ink)")


def cam_metrics(net: PredictiveNet, hparams: Hyperparameters, data: dict[str, torch.Tensor], cam: CamObjective,
                horizon: int, batch_size: int, diverged: bool) -> dict[str, float]:
    """The ``cam_iou`` metrics of ``hparams`` on ``data`` (``images``: normalized and noisy, ``labels``,
    ``objects`` and ``valid``: the masks), ``horizon`` = T."""
    if diverged:
        return {"cam_iou": 0.0}
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
    metrics = {f"cam_iou_t{t}": v for t, v in per_t.items()}
    metrics.update(cam_iou=value, cam_iou_rel=value / per_t[0] if per_t[0] > 0 else math.nan,
                   cam_seconds=time.perf_counter() - began)
    return metrics
