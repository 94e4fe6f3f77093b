"""``objective.kind = "cam_iou"``: where the network looks, as a score to maximize (Choksi et al., ESANN 2025).

A trial scores its configuration as the paper's objective does (the cross-entropy is still reported),
then explains the network with Grad-CAM and takes the IoU against the images' object masks
(:mod:`pctune.search.cam`). Its settings are ``[objective.cam]``: ``masks``, ``categories``,
``mask_resize``, ``ink_threshold``, ``cam_threshold``, ``grad_mode`` (as the explain stage's); a key
left out there is taken from ``[promotion.explain]``, where earlier versions of pctune read all of
them (that place keeps working). The IoU is measured once, on every image: no early stopping.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from pctune.errors import PctuneError
from pctune.metrics import CAM_IOU, CAM_IOU_REL, at_timestep
from pctune.schema import error, no_unknown, read_table
from pctune.search.cam import CamObjective, cam_metrics
from pctune.search.objectives.base import Objective

#: ``objective.cam_timesteps``: the IoU at t = T, or its mean over t = 1..T
CAM_TIMESTEPS = ("last", "mean")


@dataclass
class CamSettings:
    """``[objective.cam]``: the explain stage's measuring keys; None: ``[promotion.explain]``'s value."""

    masks: str | None = None
    categories: str | None = None
    mask_resize: bool | None = None
    ink_threshold: float | None = None
    cam_threshold: float | None = None
    grad_mode: str | None = None


@dataclass(frozen=True)
class CamIou(Objective):
    kind = "cam_iou"
    takes = ("cam",)
    metric = CAM_IOU
    mode = "max"
    cam: CamObjective = field(default_factory=CamObjective)
    settings: dict[str, Any] = field(default_factory=dict)  # [promotion.explain] with [objective.cam] over it

    @classmethod
    def from_job(cls, job, source: str) -> CamIou:
        cls.refuse_tables(job, source)
        if job.objective.cam_timesteps not in CAM_TIMESTEPS:
            raise error(source, "objective.cam_timesteps", f"must be one of {', '.join(CAM_TIMESTEPS)}, "
                        f"got {job.objective.cam_timesteps!r}")
        settings = _explain_settings(job, source)
        cam = CamObjective(job.objective.cam_timesteps, settings.cam_threshold, settings.grad_mode)
        return cls(timesteps=job.objective.timesteps, batch_size=job.objective.batch_size, cam=cam,
                   settings=asdict(settings))

    def check(self, job, kinds, source: str) -> None:
        if kinds.scheduler.stops_early:
            raise error(source, "search.scheduler", f"objective.kind = 'cam_iou' needs "
                        f"{kinds.schedulers_without('stops_early')[0]!r} (asha and hyperband stop trials on a "
                        "running cross-entropy; the IoU is scored once, on every image)")
        if not kinds.data.own_masks and self.settings["masks"] is None:
            raise error(source, "promotion.explain.masks", "objective.kind = 'cam_iou' on an image folder needs the "
                        "ImageNet-S mask folder (objective.cam.masks or promotion.explain.masks; the digits' objects "
                        "are their ink)")

    def allows_early_stopping(self) -> bool:
        return False

    def reported(self) -> tuple[str, ...]:
        return ()  # cam_iou, cam_iou_t<t>, cam_iou_rel: a family of pctune.metrics

    def describe(self) -> str:
        when = "at t = T" if self.cam.timesteps == "last" else "averaged over t = 1..T"
        return f"Grad-CAM IoU against the object masks, {when}, on the noisy subset; higher is better"

    def columns(self) -> tuple[str, ...]:
        return CAM_IOU, at_timestep(CAM_IOU, 0), CAM_IOU_REL

    def at_t0(self) -> str:
        return at_timestep(CAM_IOU, 0)

    def relative_label(self) -> str:
        """What IoU(T) / IoU(0) is in the study's terms (the sweep's heatmaps)."""
        return "IoU(T) / IoU(0)" if self.cam.timesteps == "last" else "mean IoU(1..T) / IoU(0)"

    def identity(self, job) -> dict[str, Any]:
        # the key and, without [objective.cam], the value of earlier pctune versions (their run directories resume)
        return {"promotion.explain": self.settings}

    def arrays(self, job, spec, net, log, unreadable):
        return cam_arrays(job, spec, net, log, self.settings)

    def scores(self, trial, sums=None):
        for metrics in trial.stream("images", self.timesteps, sums):
            if metrics["final"]:
                metrics.update(cam_metrics(trial.net, trial.hparams, trial.data, self.cam, self.timesteps,
                                           self.batch_size, bool(metrics["diverged"])))
            yield metrics


def _explain_settings(job, source: str):
    """``[promotion.explain]`` with ``[objective.cam]``'s keys over it."""
    table = job.objective.cam
    if not isinstance(table, dict):
        raise error(source, "objective.cam", "must be a table such as { cam_threshold = 0.5 }")
    no_unknown(table, list(CamSettings.__dataclass_fields__), f"{source}: objective.cam")
    given = {k: v for k, v in asdict(read_table(CamSettings, table, source, "objective.cam")).items() if v is not None}
    from pctune.evaluate.settings import check_explain

    merged = replace(job.promotion.settings["explain"], **given)
    check_explain(merged, source, "objective.cam")  # the stage's own ranges; [promotion.explain] passed them already
    return merged


def cam_arrays(job, spec, net, log, settings: dict[str, Any]) -> dict[str, np.ndarray]:
    """A ``cam_iou`` search's noisy images, labels and object masks, in the evaluation order: the seeded
    subset's images that have a mask (the digits' ink, or ImageNet-S PNGs matched by file name), with the
    objective's noise in normalized space. An image of a folder that cannot be decoded is an error here
    (its mask would be matched to the wrong image)."""
    from pctune.data.noise import add_gaussian_noise
    from pctune.data.sources import data_source
    from pctune.evaluate.settings import ExplainSettings
    from pctune.measure.images import clean_images
    from pctune.measure.masks import masked_images
    from pctune.search.images import noise_seed, seeded_order, spec_classes

    data, source = job.data, data_source(job.data.source)
    size = data.image_size or spec.input_size[-1]
    if source.reads_folder and size != spec.input_size[-1]:  # the masks are cropped at the model's size
        raise PctuneError(f"{job.source}: data.image_size: objective.kind = 'cam_iou' on an image folder takes the "
                          f"model's input size ({spec.input_size[-1]}), got {size}")
    images = clean_images(data.source, data.path, (spec.input_size[0], size, size), data.num_images, data.seed,
                          data.workers, None if source.own_classes else spec_classes(spec))
    at_subset = ExplainSettings(**{**settings, "num_images": data.num_images, "seed": data.seed})  # the job's subset
    pixels, labels, objects, valid = masked_images(images, at_subset, net, log)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (images.mean, images.std))
    noisy = add_gaussian_noise(((pixels - mean) / std).float(), job.objective.sigma, noise_seed(job))
    order = seeded_order(len(labels), data.seed)
    return {"images": np.ascontiguousarray(noisy.numpy()[order]), "labels": labels.to(torch.int64).numpy()[order],
            "objects": objects.numpy()[order], "valid": valid.numpy()[order]}
