"""Preparing a search, once on the driver: the model with its weights, the arrays every trial is
scored on (made by the job's objective), the starting points in the space's coordinates, the plan of
the strategy and the penalty of a diverged trial."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pctune.data.sources import data_source
from pctune.errors import PctuneError
from pctune.models.spec import ModelSpec
from pctune.models.weights import is_weights_uri
from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet
from pctune.search.images import (  # noqa: F401 (re-exported: they were defined here before)
    check_classes,
    evaluation_order,
    noisy_images,
    seeded_order,
    spec_classes,
)
from pctune.search.job import Job
from pctune.search.objective import default_penalty
from pctune.search.searchers import StartingPoint
from pctune.search.space import SearchSpace, load_space
from pctune.utils import Log, print_line

_print = print_line  # the default log (kept under its earlier name)


@dataclass
class Prepared:
    """What the driver computes once per search."""

    job: Job
    spec: ModelSpec
    net: PredictiveNet
    space: SearchSpace
    starting_points: list[StartingPoint]
    arrays: dict[str, np.ndarray]  # what every trial is scored on (the objective's: labels, images, ...)
    penalty: float
    unreadable: list[str] = field(default_factory=list)  # images skipped because they cannot be decoded
    grids: list = field(default_factory=list)  # the strategy's grids (single-pcoder-grid: one per pcoder)

    @property
    def objective(self):
        return self.job.kinds.objective

    @property
    def labels(self) -> np.ndarray:
        return self.arrays["labels"]

    @property
    def images(self) -> np.ndarray:
        """The images (a robust objective: its first condition's)."""
        return self.arrays.get("images", next((v for k, v in self.arrays.items() if k.startswith("images/")), None))

    @property
    def conditions(self) -> dict[str, np.ndarray]:
        """A robust objective's images per condition (else none)."""
        return {k[len("images/"):]: v for k, v in self.arrays.items() if k.startswith("images/")}


def load_job_model(job: Job, log: Log = _print) -> tuple[ModelSpec, PredictiveNet]:
    """The model with its weights, built once on the driver, and its spec (sent to the workers)."""
    from pctune.models.registry import create_model, get_spec

    cfg = job.model
    spec = copy.deepcopy(get_spec(cfg.name))
    if cfg.gradient_scaling is not None:
        spec.gradient_scaling = cfg.gradient_scaling
    if cfg.backbone:
        spec.backbone = cfg.backbone
    backbone_weights, feedback_weights = cfg.backbone_weights, cfg.feedback_weights
    if cfg.is_builtin_demo:
        from pctune.data.demo import ensure_demo_model

        paths = ensure_demo_model(log=log)
        backbone_weights, feedback_weights = paths["backbone"], paths["feedback"]
    elif feedback_weights is None:
        log(f"warning: {job.source}: model.feedback_weights is not set; the decoders are untrained")
    net = create_model(cfg.name, pretrained=cfg.pretrained, feedback_weights=feedback_weights,
                       gradient_scaling=spec.gradient_scaling, backbone_weights=backbone_weights,
                       backbone=cfg.backbone)
    return spec, net


def starting_points(job: Job, net: PredictiveNet, space: SearchSpace) -> list[StartingPoint]:
    """The job's starting points (preset names or inline tables), in the space's coordinates."""
    points = []
    for i, entry in enumerate(job.search.starting_points, start=1):
        label = entry if isinstance(entry, str) else str(entry.get("name", f"point{i}"))
        try:
            if isinstance(entry, str):
                hp = net.hyperparameters(entry)
            else:
                table = {k: v for k, v in entry.items() if k != "name"}
                hp = Hyperparameters.from_mapping(table, net.num_pcoders).for_pcoders(net.num_pcoders)
        except PctuneError as exc:
            raise PctuneError(f"{job.source}: search.starting_points[{i}]: {exc}") from exc
        coords, notes = space.encode(hp, label=f"starting point {label!r}")
        points.append(StartingPoint(label, space.decode(coords), coords, notes))
    return points


def check_paths(job: Job) -> None:
    """Fail fast, before building a large model, on files the job names that do not exist."""
    if data_source(job.data.source).reads_folder and not Path(job.data.path).is_dir():
        raise PctuneError(f"{job.source}: data.path: {job.data.path}: no such directory (pass --data PATH)")
    weights = job.model.feedback_weights
    for path in [weights] if isinstance(weights, str) else (weights or []):
        if is_weights_uri(path):  # resolved by the orchestration (pctune.lineage) before the search starts
            raise PctuneError(f"{job.source}: model.feedback_weights: {path} names MLflow weights, which "
                              "pctune.pipeline.search resolves to a file first (run the search with `pctune search`)")
        if not Path(path).exists():
            raise PctuneError(f"{job.source}: model.feedback_weights: {path}: no such file or directory "
                              "(pass --feedback-weights PATH)")
    if job.model.backbone_weights and not Path(job.model.backbone_weights).is_file():
        raise PctuneError(f"{job.source}: model.backbone_weights: {job.model.backbone_weights}: no such file "
                          "(pass --backbone-weights PATH)")


def prepare(job: Job, log: Log = _print) -> Prepared:
    """Everything the search computes once, on the driver (the job's paths are checked by the caller,
    :func:`check_paths`, before anything else)."""
    spec, net = load_job_model(job, log)
    space = load_space(job.space_path, net.num_pcoders)
    strategy = job.kinds.strategy
    points = starting_points(job, net, space) if strategy.starts_from_points() else []
    for point in points:
        for note in point.notes:
            log(f"note: {note}")
    grids = strategy.prepare(job, net, space)
    num_classes = check_classes(job, net)
    unreadable: list[str] = []
    arrays = job.kinds.objective.arrays(job, spec, net, log, unreadable)
    if unreadable:
        log(f"warning: {len(unreadable)} unreadable images skipped (listed in job.json), e.g. {unreadable[0]}")
    penalty = job.objective.divergence_penalty or default_penalty(num_classes)
    return Prepared(job, spec, net, space, points, arrays, penalty, unreadable, grids)
