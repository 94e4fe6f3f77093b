"""Preparing a search, once on the driver: the model with its weights, the fixed noisy images, the
starting points in the space's coordinates, and the penalty of a diverged trial."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pctune.errors import PctuneError
from pctune.models.spec import ModelSpec
from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet
from pctune.search.grid import GRID_STRATEGY, PcoderGrid, pcoder_grids
from pctune.search.job import Job
from pctune.search.objective import default_penalty
from pctune.search.space import SearchSpace, load_space

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


@dataclass
class StartingPoint:
    label: str
    hparams: Hyperparameters
    coords: dict[str, float]
    notes: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """What the driver computes once per search."""

    job: Job
    spec: ModelSpec
    net: PredictiveNet
    space: SearchSpace
    starting_points: list[StartingPoint]
    images: np.ndarray
    labels: np.ndarray
    penalty: float
    unreadable: list[str] = field(default_factory=list)  # images skipped because they cannot be decoded
    # a robust objective (objective.conditions): condition name -> its images, in the order of `labels`;
    # `images` is then the first condition's
    conditions: dict[str, np.ndarray] = field(default_factory=dict)
    # objective.kind = "cam_iou": the object masks of `images` ("objects", "valid": [N, H, W] bool)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    grids: list[PcoderGrid] = field(default_factory=list)  # strategy "single-pcoder-grid": one per pcoder


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


def noisy_images(job: Job, spec: ModelSpec, unreadable: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The fixed image subset with its noise (drawn once from the seed), as numpy arrays. With
    ``data.unreadable = "skip"``, images that cannot be decoded are left out and listed in ``unreadable``."""
    import torch

    from pctune.data.noise import add_gaussian_noise

    images, labels = _checked_subset(job, spec, unreadable)
    seed = job.objective.noise_seed if job.objective.noise_seed is not None else job.data.seed
    noisy = add_gaussian_noise(images.float(), job.objective.sigma, seed)
    return noisy.contiguous().numpy(), labels.to(torch.int64).numpy()


def _checked_subset(job: Job, spec: ModelSpec, unreadable: list[str] | None):
    data = job.data
    try:
        images, labels = _clean_subset(job, spec, unreadable if data.unreadable == "skip" else None)
    except PctuneError as exc:  # the digits can only fail on their count; a folder on anything
        field = "data.num_images" if data.source == "digits" else "data"
        raise PctuneError(f"{job.source}: {field}: {exc}") from exc
    if images.shape[1] != spec.input_size[0]:
        raise PctuneError(f"{job.source}: data: images have {images.shape[1]} channels but {spec.name} expects "
                          f"{spec.input_size[0]}")
    return images, labels


def condition_images(job: Job, spec: ModelSpec, unreadable: list[str] | None = None
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every condition of the job's robust objective applied to the same fixed clean subset (noise
    drawn from the noise seed, corruptions seeded per image), as numpy arrays."""
    from pctune.search.conditions import condition_images as perturb

    clean, labels = _checked_subset(job, spec, unreadable)
    mean, std = _normalization(job)
    seed = job.objective.noise_seed if job.objective.noise_seed is not None else job.data.seed
    sets = {c.name: perturb(c, clean.float(), mean, std, seed).contiguous().numpy()
            for c in job.objective.robust(job.source).conditions}
    return sets, labels.to(torch.int64).numpy()


def _normalization(job: Job) -> tuple[list[float], list[float]]:
    """The (mean, std) the search's images were normalized with (to go back to pixels)."""
    if job.data.source == "digits":
        from pctune.data.demo import digits_normalization

        mean, std = digits_normalization()
        return [mean], [std]
    from pctune.data.folders import IMAGENET_MEAN, IMAGENET_STD

    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def _clean_subset(job: Job, spec: ModelSpec, unreadable: list[str] | None):
    data, size = job.data, job.data.image_size or spec.input_size[-1]
    if data.source == "digits":
        from pctune.data.demo import digits
        from pctune.data.subsets import subset_indices

        images, labels = digits("test", image_size=size)
        idx = subset_indices(len(labels), data.num_images, data.seed)
        return images[idx], labels[idx]
    from pctune.data.subsets import load_val_subset

    return load_val_subset(data.path, data.num_images, data.seed, size, data.workers, unreadable=unreadable,
                           classes=spec_classes(spec))


def check_classes(job: Job, net: PredictiveNet) -> int:
    """The model's number of classes, checked against the data's before any image is loaded: class
    folders are labelled by the model's class list (a wnid keeps its true index), or, for a model without
    one, in sorted order, and then the counts must agree (:func:`pctune.data.classes.map_classes`)."""
    from pctune.data.classes import map_classes
    from pctune.models.registry import model_classes

    try:
        classes = model_classes(net)
    except PctuneError as exc:
        raise PctuneError(f"{job.source}: model: {exc}") from exc
    num_classes = classes.count
    if job.data.source == "digits":
        if num_classes != 10:
            raise PctuneError(f"{job.source}: the digits have 10 classes but {job.model.name} predicts {num_classes} "
                              "classes")
        return num_classes
    from pctune.data.folders import folder_classes

    found = folder_classes(job.data.path)
    if classes.names is None and len(found) != num_classes:
        raise PctuneError(f"{job.source}: data.path: {job.data.path} has {len(found)} class folders but "
                          f"{job.model.name} predicts {num_classes} classes (class folders are mapped to the outputs "
                          "in sorted order)")
    try:
        map_classes(found, classes, str(job.data.path))
    except PctuneError as exc:
        raise PctuneError(f"{job.source}: data.path: {exc}") from exc
    return num_classes


def spec_classes(spec: ModelSpec):
    """The class list ``spec`` declares, for labelling the job's folder (checked against the network's
    outputs by :func:`check_classes`)."""
    from pctune.data.classes import ModelClasses, resolve_classes

    return ModelClasses(resolve_classes(spec.classes), None, spec.name)


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
    if job.data.source == "imagenet-val" and not Path(job.data.path).is_dir():
        raise PctuneError(f"{job.source}: data.path: {job.data.path}: no such directory (pass --data PATH)")
    weights = job.model.feedback_weights
    for path in [weights] if isinstance(weights, str) else (weights or []):
        if not Path(path).exists():
            raise PctuneError(f"{job.source}: model.feedback_weights: {path}: no such file or directory "
                              "(pass --feedback-weights PATH)")
    if job.model.backbone_weights and not Path(job.model.backbone_weights).is_file():
        raise PctuneError(f"{job.source}: model.backbone_weights: {job.model.backbone_weights}: no such file "
                          "(pass --backbone-weights PATH)")


def evaluation_order(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The images in the fixed seeded order every trial scores them in. A folder's subset comes sorted
    by class; shuffled, the first images a trial sees (all a trial stopped early sees) are a fair sample."""
    order = seeded_order(len(labels), seed)
    return np.ascontiguousarray(images[order]), labels[order]


def seeded_order(count: int, seed: int) -> np.ndarray:
    """The permutation of :func:`evaluation_order`."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(int(seed))).numpy()


def cam_images(job: Job, spec: ModelSpec, net: PredictiveNet, log: Log
               ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A ``cam_iou`` search's noisy images, labels and object masks, in the evaluation order: the seeded
    subset's images that have a mask, by the explain stage's rule ([promotion.explain]: the digits'
    ink, or ImageNet-S PNGs matched by file name), with the objective's noise in normalized space. An image
    of a folder that cannot be decoded is an error here (its mask would be matched to the wrong image)."""
    from dataclasses import replace

    from pctune.data.noise import add_gaussian_noise
    from pctune.evaluate.images import clean_images
    from pctune.evaluate.stages import masked_images

    data = job.data
    size = data.image_size or spec.input_size[-1]
    if data.source != "digits" and size != spec.input_size[-1]:  # the masks are cropped at the model's size
        raise PctuneError(f"{job.source}: data.image_size: objective.kind = 'cam_iou' on an image folder takes the "
                          f"model's input size ({spec.input_size[-1]}), got {size}")
    images = clean_images(data.source, data.path, (spec.input_size[0], size, size), data.num_images, data.seed,
                          data.workers, None if data.source == "digits" else spec_classes(spec))
    settings = replace(job.promotion.settings["explain"], num_images=data.num_images, seed=data.seed)
    pixels, labels, objects, valid = masked_images(images, settings, net, log)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (images.mean, images.std))
    seed = job.objective.noise_seed if job.objective.noise_seed is not None else data.seed
    noisy = add_gaussian_noise(((pixels - mean) / std).float(), job.objective.sigma, seed)
    order = seeded_order(len(labels), data.seed)
    masks = {"objects": objects.numpy()[order], "valid": valid.numpy()[order]}
    return np.ascontiguousarray(noisy.numpy()[order]), labels.to(torch.int64).numpy()[order], masks


def prepare(job: Job, log: Log = _print) -> Prepared:
    """Everything the search computes once, on the driver (the job's paths are checked by the caller,
    :func:`check_paths`, before anything else)."""
    spec, net = load_job_model(job, log)
    space_path = job.space_path
    space = load_space(space_path, net.num_pcoders)
    grid = job.search.strategy == GRID_STRATEGY
    points = [] if grid else starting_points(job, net, space)  # a grid sweep runs its grid only
    for point in points:
        for note in point.notes:
            log(f"note: {note}")
    if job.search.strategy == "per-pcoder":
        net.hyperparameters(job.search.defaults)  # the preset must exist
        if space.shared:
            raise PctuneError(f"{job.source}: search.strategy = 'per-pcoder' needs a space with shared = false "
                              f"({space_path})")
    grids = pcoder_grids(space, job.search.grid, f"{job.source}: search.grid") if grid else []
    num_classes = check_classes(job, net)
    unreadable: list[str] = []
    conditions, masks = {}, {}
    if job.objective.robust(job.source):
        sets, clean_labels = condition_images(job, spec, unreadable)
        for name, condition in sets.items():  # one seeded order: the same for every condition
            conditions[name], labels = evaluation_order(condition, clean_labels, job.data.seed)
        images = next(iter(conditions.values()))
    elif job.objective.kind == "cam_iou":
        images, labels, masks = cam_images(job, spec, net, log)
    else:
        images, labels = evaluation_order(*noisy_images(job, spec, unreadable), job.data.seed)
    if unreadable:
        log(f"warning: {len(unreadable)} unreadable images skipped (listed in job.json), e.g. {unreadable[0]}")
    penalty = job.objective.divergence_penalty or default_penalty(num_classes)
    return Prepared(job, spec, net, space, points, images, labels, penalty, unreadable, conditions, masks, grids)
