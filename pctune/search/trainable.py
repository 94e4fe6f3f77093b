"""The Ray side of a trial: a thin function trainable around :func:`pctune.search.objective.score`.

The model (spec + state dict) and the noisy images are put into the Ray object store once per
search; every worker process builds the model and moves the images to its device once and keeps them
in module-level caches keyed by content digests, so a trial costs one evaluation, not a model load.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pctune.models.registry import output_classes
from pctune.models.spec import ModelSpec
from pctune.models.state import model_from_state, state_arrays  # noqa: F401 (re-exported)
from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet
from pctune.search.objective import RunningSums, default_penalty, score_chunks
from pctune.search.objectives import CrossEntropy, Objective, TrialContext
from pctune.search.space import hparams_from_config
from pctune.search.t0cache import CACHE

_MODELS: OrderedDict[tuple, PredictiveNet] = OrderedDict()
_DATA: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
_CACHE_SIZE = 2  # a worker reused across searches keeps at most this many models / image sets
STATS = {"model_loads": 0, "data_loads": 0}


@dataclass
class TrialPayload:
    """Everything a trial needs besides its config, sent once per search; small (the big parts are
    ObjectRefs). Like the promotion stages' ``CorruptionPayload`` and ``AttackPayload``."""

    spec: ModelSpec
    model_key: str
    model_ref: Any  # ObjectRef of {name: np.ndarray}: the whole PredictiveNet state dict
    data_key: str
    data_ref: Any  # ObjectRef of {"images": np.ndarray, "labels": np.ndarray}
    timesteps: int
    batch_size: int
    penalty: float | None = None
    objective: Objective = field(default_factory=CrossEntropy)  # how a trial scores (job.kinds.objective)
    report_at: tuple[int, ...] = ()  # images seen at which a trial reports (pctune.search.schedulers)
    checkpoint: bool = False  # save the running sums with every report (a paused trial resumes from them)
    cache_gb: float = 0.0  # per worker: timestep-0 results kept for later trials (pctune.search.t0cache)
    # On resume: results of trials that finished just before the driver died but that the saved
    # experiment state still lists as running. Tune reruns those; they replay their result instead.
    replay: dict[str, dict[str, float]] = field(default_factory=dict)


def digest_arrays(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.data)
    return h.hexdigest()


def trial_device() -> torch.device:
    """The GPU Ray assigned to this worker (Ray sets CUDA_VISIBLE_DEVICES), else the CPU."""
    import ray

    if torch.cuda.is_available() and ray.is_initialized() and ray.get_gpu_ids():
        return torch.device("cuda:0")
    return torch.device("cpu")


def set_worker_threads() -> None:
    """A Ray worker computes with as many threads as it was given CPUs (the driver keeps its own)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))


def materialize(setup: TrialPayload, device: torch.device) -> tuple[PredictiveNet, dict[str, torch.Tensor]]:
    """The cached model and image arrays (``labels``, ``images`` or ``images/<condition>``) of ``setup``
    on ``device`` (fetched and built on a cache miss)."""
    import ray

    model_key = (setup.model_key, str(device))
    if model_key not in _MODELS:
        state = ray.get(setup.model_ref)
        _MODELS[model_key] = model_from_state(setup.spec, state).to(device)
        STATS["model_loads"] += 1
        _trim(_MODELS)
    data_key = (setup.data_key, str(device))
    if data_key not in _DATA:
        data = ray.get(setup.data_ref)
        _DATA[data_key] = {name: torch.from_numpy(np.array(array)).to(device) for name, array in data.items()}
        STATS["data_loads"] += 1
        _trim(_DATA)
    _MODELS.move_to_end(model_key)
    _DATA.move_to_end(data_key)
    return _MODELS[model_key], _DATA[data_key]


def _trim(cache: OrderedDict) -> None:
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def evaluate_chunks(setup: TrialPayload, hparams: Hyperparameters,
                    sums: RunningSums | None = None) -> Iterator[dict[str, float]]:
    """Score ``hparams`` in this process (a Tune trial or a plain Ray task), yielding the running
    metrics at every report point of ``setup`` (the last one final)."""
    set_worker_threads()
    device = trial_device()
    net, data = materialize(setup, device)
    counter = {"cached": 0}
    hparams = hparams.for_pcoders(net.num_pcoders)

    def stream(images_key: str, timesteps: int, sums_: RunningSums | None = None):
        starts = None
        if setup.cache_gb > 0:
            starts = CACHE.starts(net, (setup.model_key, setup.data_key, str(device)), setup.cache_gb, counter,
                                  images=images_key)
        return score_chunks(net, data[images_key], data["labels"], hparams, timesteps=timesteps,
                            batch_size=setup.batch_size, report_at=setup.report_at, penalty=setup.penalty,
                            starts=starts, sums=sums_)

    penalty = setup.penalty if setup.penalty is not None else default_penalty(output_classes(net))
    for metrics in setup.objective.scores(TrialContext(net, data, hparams, penalty, stream), sums):
        metrics["model_loads"] = float(STATS["model_loads"])
        metrics["gpu"] = float(device.type == "cuda")
        metrics["t0_cached"] = float(counter["cached"])  # images whose timestep 0 came from the cache
        yield metrics


def evaluate(setup: TrialPayload, hparams: Hyperparameters) -> dict[str, float]:
    """The final metrics of :func:`evaluate_chunks` (the same batches as the trials: the same rounding)."""
    *_, final = evaluate_chunks(setup, hparams)
    return final


def run_trial(config: dict[str, Any], setup: TrialPayload) -> None:
    """The Ray Tune function trainable: reports the running score at each report point."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    if trial_id in setup.replay:
        tune.report({**setup.replay[trial_id], "replayed": 1.0})
        return
    hparams = hparams_from_config(config, setup.spec.num_pcoders)
    sums = None
    if setup.checkpoint:  # a trial HyperBand paused resumes from its running sums
        sums = _restored_sums() or RunningSums(setup.timesteps, setup.spec.num_pcoders)
    # node_id: the Ray node the trial ran on (a string: kept in result.json, never an MLflow metric)
    node = node_id()
    for metrics in evaluate_chunks(setup, hparams, sums):
        _report({**metrics, "node_id": node}, sums)


_SUMS_FILE = "running_sums.json"


def _restored_sums() -> RunningSums | None:
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return RunningSums.from_state(json.loads((Path(folder) / _SUMS_FILE).read_text()))


def _report(metrics: dict[str, Any], sums: RunningSums | None) -> None:
    """``tune.report``, with the running sums as a checkpoint when the trial may be paused."""
    from ray import tune

    if sums is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / _SUMS_FILE).write_text(json.dumps(sums.state()))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def node_id() -> str:
    """This process's Ray node id (hex), or "" outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def evaluate_task(setup: TrialPayload, hparams_mapping: dict) -> dict[str, float]:
    """Body of the Ray task that scores reference points (feedforward, presets, combinations)."""
    return evaluate(setup, Hyperparameters.from_mapping(hparams_mapping))


def evaluate_here(setup: TrialPayload, hparams: Hyperparameters, threads: int) -> dict[str, float]:
    """:func:`evaluate` in this (the driver's) process on the CPU, with a trial's ``threads``."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return evaluate(setup, hparams)
    finally:
        torch.set_num_threads(before)
