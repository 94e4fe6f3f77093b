"""The images a search scores, prepared once on the driver: the job's seeded subset of its data
source, checked against the model, perturbed as the objective says and put in the fixed evaluation
order. The objectives (:mod:`pctune.search.objectives`) build their arrays from these."""

from __future__ import annotations

import numpy as np
import torch

from pctune.data.sources import data_source
from pctune.errors import PctuneError
from pctune.models.spec import ModelSpec
from pctune.pc.network import PredictiveNet


def noise_seed(job) -> int:
    """The seed of the objective's noise: ``objective.noise_seed``, else ``data.seed``."""
    return job.objective.noise_seed if job.objective.noise_seed is not None else job.data.seed


def noisy_images(job, spec: ModelSpec, unreadable: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The fixed image subset with its noise (drawn once from the seed), as numpy arrays. With
    ``data.unreadable = "skip"``, images that cannot be decoded are left out and listed in ``unreadable``."""
    from pctune.data.noise import add_gaussian_noise

    images, labels = checked_subset(job, spec, unreadable)
    noisy = add_gaussian_noise(images.float(), job.objective.sigma, noise_seed(job))
    return noisy.contiguous().numpy(), labels.to(torch.int64).numpy()


def checked_subset(job, spec: ModelSpec, unreadable: list[str] | None):
    """The job's clean, normalized subset at its image size, with a one-line error naming the job's key."""
    data, source = job.data, data_source(job.data.source)
    try:
        images, labels = source.subset(data.path, data.num_images, data.seed, data.image_size or spec.input_size[-1],
                                       data.workers, unreadable if data.unreadable == "skip" else None,
                                       None if source.own_classes else spec_classes(spec))
    except PctuneError as exc:  # a source without a folder can only fail on its count; a folder on anything
        field = "data" if source.reads_folder else "data.num_images"
        raise PctuneError(f"{job.source}: {field}: {exc}") from exc
    if images.shape[1] != spec.input_size[0]:
        raise PctuneError(f"{job.source}: data: images have {images.shape[1]} channels but {spec.name} expects "
                          f"{spec.input_size[0]}")
    return images, labels


def spec_classes(spec: ModelSpec):
    """The class list ``spec`` declares, for labelling the job's folder (checked against the network's
    outputs by :func:`check_classes`)."""
    from pctune.data.classes import ModelClasses, resolve_classes

    return ModelClasses(resolve_classes(spec.classes), None, spec.name)


def check_classes(job, net: PredictiveNet) -> int:
    """The model's number of classes, checked against the data's before any image is loaded: class
    folders are labelled by the model's class list (a wnid keeps its true index), or, for a model without
    one, in sorted order, and then the counts must agree (:func:`pctune.data.classes.map_classes`)."""
    from pctune.data.classes import map_classes
    from pctune.models.registry import model_classes

    try:
        classes = model_classes(net)
    except PctuneError as exc:
        raise PctuneError(f"{job.source}: model: {exc}") from exc
    num_classes, source = classes.count, data_source(job.data.source)
    if source.own_classes:
        if num_classes != source.own_classes:
            raise PctuneError(f"{job.source}: the {source.name} have {source.own_classes} classes but "
                              f"{job.model.name} predicts {num_classes} classes")
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


def evaluation_order(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The images in the fixed seeded order every trial scores them in. A folder's subset comes sorted
    by class; shuffled, the first images a trial sees (all a trial stopped early sees) are a fair sample."""
    order = seeded_order(len(labels), seed)
    return np.ascontiguousarray(images[order]), labels[order]


def seeded_order(count: int, seed: int) -> np.ndarray:
    """The permutation of :func:`evaluation_order`."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(int(seed))).numpy()
