"""The search driver: Ray Tune's ``Tuner`` with Optuna as the search algorithm.

Layout of a job's run directory (``<storage_path>/<job name>``, default ``./pctune_runs/<job>``):

    job.json            the resolved job (model, space, data) as the search ran it
    references.json     scores of the feedforward baseline and the model's presets
    joint/              Ray Tune experiment (strategy "joint")
    pcoder1/ ...        one Ray Tune experiment per pcoder (strategy "per-pcoder")
    combination.json    per-pcoder: the combined winners and their score
    leaderboard.csv, best.toml   written by ``pctune results`` (and at the end of a search)

``--resume`` restores every unfinished experiment with ``Tuner.restore`` (finished trials are kept,
unfinished ones rerun) and skips finished stages.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune
from ray.tune.logger import JsonLoggerCallback

from pctune.errors import PctuneError
from pctune.models.spec import ModelSpec
from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet
from pctune.search.job import Job
from pctune.search.objective import METRIC, MODE, default_penalty
from pctune.search.space import SearchSpace, SpaceSampler, hparams_to_config, load_space
from pctune.search.trainable import TrialSetup, digest_arrays, state_arrays

Log = Callable[[str], None]

#: A trial whose worker or node dies is rerun (same trial id, same config) up to this many times. A
#: diverging trial never raises (it reports a finite penalty), so only real failures are retried.
MAX_FAILURES = 3


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


# -- preparation --------------------------------------------------------------------------------
def build_model(job: Job, log: Log = _print) -> tuple[ModelSpec, PredictiveNet]:
    """The model with its weights, built once on the driver, and its spec (sent to the workers)."""
    from pctune.models.registry import create_model, get_spec

    cfg = job.model
    spec = copy.deepcopy(get_spec(cfg.name))
    if cfg.gradient_scaling is not None:
        spec.gradient_scaling = cfg.gradient_scaling
    backbone_weights, feedback_weights = cfg.backbone_weights, cfg.feedback_weights
    if cfg.is_builtin_demo:
        from pctune.data.demo import ensure_demo_model

        paths = ensure_demo_model(log=log)
        backbone_weights, feedback_weights = paths["backbone"], paths["feedback"]
    elif feedback_weights is None:
        log(f"warning: {job.source}: model.feedback_weights is not set; the decoders are untrained")
    net = create_model(cfg.name, pretrained=cfg.pretrained, feedback_weights=feedback_weights,
                       gradient_scaling=spec.gradient_scaling, backbone_weights=backbone_weights)
    return spec, net


def load_images(job: Job, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """The fixed image subset with its noise (drawn once from the seed), as numpy arrays."""
    import torch

    from pctune.data.noise import add_gaussian_noise
    from pctune.data.subsets import subset_indices

    data = job.data
    if data.source == "digits":
        from pctune.data.demo import digits

        images, labels = digits("test", image_size=data.image_size or spec.input_size[-1])
        try:
            idx = subset_indices(len(labels), data.num_images, data.seed)
        except PctuneError as exc:
            raise PctuneError(f"{job.source}: data.num_images: {exc}") from None
        images, labels = images[idx], labels[idx]
    else:
        from pctune.data.subsets import load_val_subset

        try:
            images, labels = load_val_subset(data.path, data.num_images, data.seed,
                                             data.image_size or spec.input_size[-1], data.workers)
        except PctuneError as exc:
            raise PctuneError(f"{job.source}: data: {exc}") from None
    if images.shape[1] != spec.input_size[0]:
        raise PctuneError(f"{job.source}: data: images have {images.shape[1]} channels but {spec.name} expects "
                          f"{spec.input_size[0]}")
    seed = job.objective.noise_seed if job.objective.noise_seed is not None else data.seed
    noisy = add_gaussian_noise(images.float(), job.objective.sigma, seed)
    return noisy.contiguous().numpy(), labels.to(torch.int64).numpy()


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
            raise PctuneError(f"{job.source}: search.starting_points[{i}]: {exc}") from None
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


def prepare(job: Job, log: Log = _print) -> Prepared:
    check_paths(job)
    spec, net = build_model(job, log)
    space_path = job.space_path
    space = load_space(space_path, net.num_pcoders)
    points = starting_points(job, net, space)
    for point in points:
        for note in point.notes:
            log(f"note: {note}")
    if job.search.strategy == "per-pcoder":
        net.hyperparameters(job.search.defaults)  # the preset must exist
        if space.shared:
            raise PctuneError(f"{job.source}: search.strategy = 'per-pcoder' needs a space with shared = false "
                              f"({space_path})")
    images, labels = load_images(job, spec)
    with_classes = net(_first(images, net)).shape[-1]
    penalty = job.objective.divergence_penalty or default_penalty(with_classes)
    return Prepared(job, spec, net, space, points, images, labels, penalty)


def _first(images: np.ndarray, net: PredictiveNet):
    import torch

    with torch.no_grad():
        return torch.from_numpy(images[:1].copy()).to(next(net.parameters()).device)


# -- Ray ----------------------------------------------------------------------------------------
def connect(address: str | None, log: Log = _print) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``), else start a local Ray; reuse a Ray that
    this process already initialized."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log(f"connecting to the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=False, runtime_env=_runtime_env())
    else:
        # address="local": never join some other Ray that happens to run on this machine.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    resources = ray.cluster_resources()
    log(f"Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")


def check_resources(job: Job, log: Log = _print) -> None:
    """A trial that asks for more than the cluster has would wait forever: an error on a local Ray, a
    warning on a cluster (which may scale up)."""
    import ray

    have = ray.cluster_resources()
    local = not (job.run.address or os.environ.get("RAY_ADDRESS"))
    for key, ray_key, flag in (("gpu", "GPU", "--gpus-per-trial"), ("cpu", "CPU", "--cpus-per-trial")):
        want = job.search.resources[key]
        if want > have.get(ray_key, 0):
            message = (f"{job.source}: search.resources.{key} = {want:g} per trial but the Ray cluster has "
                       f"{have.get(ray_key, 0):g} (set {flag})")
            if local:
                raise PctuneError(message)
            log(f"warning: {message}")


def _runtime_env() -> dict:
    """Ship this pctune package to the cluster's workers (its dependencies must be installed there), so
    the nodes run the driver's version of the code. ``PCTUNE_SHIP_CODE=0`` turns it off (pctune is
    installed on every node)."""
    if os.environ.get("PCTUNE_SHIP_CODE", "1") == "0":
        return {}
    import pctune

    return {"py_modules": [str(Path(pctune.__file__).parent)]}


def make_sampler(name: str, seed: int, concurrent: int, source: str = "<job>"):
    """The Optuna sampler named in the job, seeded."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=concurrent > 1)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise PctuneError(f"{source}: search.sampler = 'cmaes' needs the cmaes package "
                              "(pip install cmaes)") from None
        return optuna.samplers.CmaEsSampler(seed=seed)
    raise PctuneError(f"{source}: search.sampler: unknown sampler {name!r}")


def trial_setup(prep: Prepared) -> TrialSetup:
    """Put the model and the noisy images into the object store (once per search)."""
    import ray

    state = state_arrays(prep.net)
    data = {"images": prep.images, "labels": prep.labels}
    return TrialSetup(spec=prep.spec, model_key=digest_arrays(state), model_ref=ray.put(state),
                      data_key=digest_arrays(data), data_ref=ray.put(data),
                      timesteps=prep.job.objective.timesteps, batch_size=prep.job.objective.batch_size,
                      penalty=prep.penalty)


def evaluate_points(setup: TrialSetup, points: dict[str, Hyperparameters], resources: dict) -> dict[str, dict]:
    """Score named points as plain Ray tasks (in parallel), on the same workers and caches as trials."""
    import ray

    from pctune.search.trainable import evaluate_task

    task = ray.remote(evaluate_task).options(num_cpus=resources["cpu"], num_gpus=resources["gpu"])
    refs = {name: task.remote(setup, hp.to_mapping()) for name, hp in points.items()}
    return {name: {"metrics": ray.get(ref), "config": hparams_to_config(points[name])}
            for name, ref in refs.items()}


# -- the search ---------------------------------------------------------------------------------
def run_search(job: Job, log: Log = _print, callbacks: list | None = None) -> dict[str, Any]:
    """Run (or resume) the job's search; returns the summary written by :mod:`pctune.search.results`.

    ``callbacks``: extra Ray Tune callbacks (e.g. experiment tracking) added to every stage."""
    run_dir = job.run_dir
    check_paths(job)
    _claim_run_dir(job, run_dir, log)
    prep = prepare(job, log)
    connect(job.run.address, log)
    check_resources(job, log)
    setup = trial_setup(prep)
    _write_json(run_dir / "job.json", _job_record(prep))
    log(f"search: {job.name} ({job.search.strategy}, sampler {job.search.sampler}, {job.search.num_samples} "
        f"trials{' per pcoder' if job.search.strategy == 'per-pcoder' else ''}, "
        f"{job.search.max_concurrent_trials} at a time) on {len(prep.labels)} images; results in {run_dir}")
    references = _references(prep, setup, run_dir, log)
    from pctune.search.results import write_results

    try:
        if job.search.strategy == "joint":
            _run_stage(prep, setup, "joint", prep.space, prep.starting_points, log, callbacks)
        else:
            _per_pcoder(prep, setup, run_dir, references, log, callbacks)
    except SearchInterrupted:
        with contextlib.suppress(PctuneError):
            write_results(job, log=log)  # what finished so far
        raise
    return write_results(job, log=log)


def _claim_run_dir(job: Job, run_dir: Path, log: Log) -> None:
    if not run_dir.exists() or not any(run_dir.iterdir()):
        if job.resume:
            log(f"nothing to resume in {run_dir}: starting a new search")
        return
    if job.resume:
        log(f"resuming the search in {run_dir}")
        return
    if job.run.if_exists == "overwrite":
        log(f"replacing the earlier search in {run_dir}")
        shutil.rmtree(run_dir)
        return
    raise PctuneError(f"{run_dir} already holds a search of {job.name}: pass --resume to continue it or "
                      "--overwrite to start over")


def _references(prep: Prepared, setup: TrialSetup, run_dir: Path, log: Log) -> dict:
    path = run_dir / "references.json"
    if path.is_file():
        return json.loads(path.read_text())
    points = {"feedforward": prep.net.hyperparameters("feedforward")}
    for preset in prep.net.presets:
        points[preset] = prep.net.hyperparameters(preset)
    start = time.perf_counter()
    refs = evaluate_points(setup, points, prep.job.search.resources)
    for name, ref in refs.items():
        log(f"reference {name:12s} mean_ce {ref['metrics'][METRIC]:.4f}")
    log(f"references scored in {time.perf_counter() - start:.1f}s")
    _write_json(path, refs)
    return refs


def _run_stage(prep: Prepared, setup: TrialSetup, stage: str, space: SearchSpace,
               points: list[StartingPoint], log: Log, callbacks: list | None = None):
    from ray.tune.search.optuna import OptunaSearch

    job = prep.job
    exp_dir = job.run_dir / stage
    if exp_dir.is_dir():
        setup = dataclasses.replace(setup, replay=_reported_results(exp_dir))
    trainable = tune.with_resources(tune.with_parameters(_trainable(), setup=setup),
                                    {"cpu": job.search.resources["cpu"], "gpu": job.search.resources["gpu"]})
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")  # save state after every event: resume loses nothing
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # result.json only (no TensorBoard/CSV)
    if exp_dir.exists():
        repair_experiment_state(exp_dir, log)
    if exp_dir.exists() and tune.Tuner.can_restore(str(exp_dir)):
        if _stage_finished(exp_dir, job.search.num_samples):
            log(f"[{stage}] already finished")
            return
        log(f"[{stage}] restoring {exp_dir}")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False)
    else:
        sampler = make_sampler(job.search.sampler, job.search.seed, job.search.max_concurrent_trials, job.source)
        searcher = OptunaSearch(space=SpaceSampler(space), metric=METRIC, mode=MODE, sampler=sampler,
                                points_to_evaluate=[p.coords for p in points] or None)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=job.search.num_samples,
                                        max_concurrent_trials=job.search.max_concurrent_trials,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=stage, storage_path=str(job.run_dir),
                                      verbose=1 if job.run.verbose else 0,
                                      callbacks=[JsonLoggerCallback(), Progress(stage, job.search.num_samples),
                                                 StateSnapshots(exp_dir), *(callbacks or [])],
                                      failure_config=tune.FailureConfig(max_failures=MAX_FAILURES)),
        )
    start = time.perf_counter()
    grid = tuner.fit()
    log(f"[{stage}] {len(grid)} trials in {time.perf_counter() - start:.1f}s"
        + (f", {grid.num_errors} errored" if grid.num_errors else ""))
    if not _stage_finished(exp_dir, job.search.num_samples) and grid.num_errors == 0:
        done = sum(1 for t in _load_trials(exp_dir) if t["status"] == "TERMINATED")
        raise SearchInterrupted(f"the search of {job.name} stopped after {done} of {job.search.num_samples} trials "
                                f"({stage}); continue it with `pctune search {_job_ref(job)} --resume`")
    return grid


def _job_ref(job: Job) -> str:
    """How to name the job on the command line: its name when that finds the same file."""
    from pctune.search.job import resolve_job_path

    try:
        same = resolve_job_path(job.name).resolve() == Path(job.source).resolve()
    except PctuneError:
        same = False
    return job.name if same else job.source


class SearchInterrupted(PctuneError):
    """The search stopped early (Ctrl-C); its state is saved and ``--resume`` continues it."""


def _load_trials(exp_dir: Path) -> list[dict]:
    from pctune.search.results import load_trials

    return load_trials(exp_dir)


_OWN_METRIC = re.compile(r"^(mean_ce|diverged|ce_t\d+|accuracy_t\d+|recon_error_pc\d+(_t\d+)?|num_images|"
                         r"eval_seconds|model_loads|gpu)$")


def _reported_results(exp_dir: Path) -> dict[str, dict[str, float]]:
    """trial id -> the metrics it reported, for every trial of ``exp_dir`` with a result on disk."""
    from pctune.search.results import load_trials

    return {t["trial_id"]: {k: v for k, v in t["metrics"].items() if _OWN_METRIC.match(k)}
            for t in load_trials(exp_dir) if t["status"] == "TERMINATED"}


def _trainable():
    from pctune.search.trainable import run_trial

    return run_trial


def _stage_finished(exp_dir: Path, num_samples: int) -> bool:
    from pctune.search.results import load_trials

    # A trial folder without a result can be an orphan of a killed driver (created after the last
    # saved state, then re-created on restore), so count the finished ones only.
    finished = [t for t in load_trials(exp_dir) if t["status"] in ("TERMINATED", "ERROR")]
    return len(finished) >= num_samples


def _per_pcoder(prep: Prepared, setup: TrialSetup, run_dir: Path, references: dict, log: Log,
                callbacks: list | None = None) -> None:
    from pctune.search.results import best_trial, load_trials

    defaults = prep.net.hyperparameters(prep.job.search.defaults)
    winners = []
    for n in range(1, prep.space.num_pcoders + 1):
        space = prep.space.only(n, defaults)
        points = []
        for point in prep.starting_points:
            mixed = [list(t) for t in defaults.triples()]
            mixed[n - 1] = list(point.hparams.triples()[n - 1])
            coords, _ = space.encode(Hyperparameters(*zip(*mixed, strict=True)), label=point.label)
            points.append(StartingPoint(point.label, space.decode(coords), coords))
        stage = f"pcoder{n}"
        _run_stage(prep, setup, stage, space, _unique(points), log, callbacks)
        best = best_trial(load_trials(run_dir / stage))
        if best is None:
            raise PctuneError(f"[{stage}] no trial finished")
        winners.append(best["hparams"].triples()[n - 1])
        log(f"[{stage}] winner beta={winners[-1][0]:.4g} lambda={winners[-1][1]:.4g} alpha={winners[-1][2]:.4g} "
            f"(mean_ce {best['metrics'][METRIC]:.4f})")
    combined = Hyperparameters(*(list(col) for col in zip(*winners, strict=True)))
    path = run_dir / "combination.json"
    if not path.is_file():
        result = evaluate_points(setup, {"combination": combined}, prep.job.search.resources)["combination"]
        _write_json(path, result)
        log(f"combination of the per-pcoder winners: mean_ce {result['metrics'][METRIC]:.4f}")


def _unique(points: list[StartingPoint]) -> list[StartingPoint]:
    seen, out = set(), []
    for p in points:
        key = tuple(sorted((k, round(v, 12)) for k, v in p.coords.items()))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _job_record(prep: Prepared) -> dict:
    job = prep.job
    return {"name": job.name, "source": str(Path(job.source).resolve()), "model": prep.spec.name,
            "num_pcoders": prep.net.num_pcoders, "space": str(job.space_path.resolve()),
            "space_description": prep.space.describe(), "strategy": job.search.strategy,
            "metric": METRIC, "mode": MODE, "penalty": prep.penalty, "num_images": len(prep.labels),
            "starting_points": [{"label": p.label, "config": hparams_to_config(p.hparams)}
                                for p in prep.starting_points],
            "job": _jsonable(asdict(job))}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    tmp.replace(path)


def _json_default(obj: Any) -> Any:
    return str(obj)


# -- Tune's experiment state, kept safe from a killed driver ----------------------------------------
# Tune saves its experiment-level state (experiment_state-<session>.json, the searcher's state) into a
# staging folder after every step, rewriting the JSON in place, and copies it to the experiment folder
# in the background. A driver killed while either happens leaves a file cut short, or files of
# different steps; Tune then starts the experiment over, or its searcher waits forever for a trial the
# experiment state does not know. So after every step that changed a trial, pctune snapshots the
# staging folder's state files (complete and consistent at that moment) into one file, replaced
# atomically, and ``--resume`` puts that snapshot back before Tune restores.
_STATE_FILES = ("experiment_state-*.json", "searcher-state-*.pkl", "search_gen_state-*.json")


def _state_snapshot_path(exp_dir: Path) -> Path:
    return exp_dir.parent / f".{exp_dir.name}.tune-state.pkl"


def _state_files(folder: Path) -> list[Path]:
    return sorted(f for pattern in _STATE_FILES for f in folder.glob(pattern) if f.is_file())


def _session(name: str) -> str:
    """The driver session's start time in a state file's name (they sort in time order)."""
    match = re.search(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", name)
    return match.group(0) if match else ""


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def snapshot_experiment_state(staging: Path, exp_dir: Path) -> bool:
    """Snapshot the newest session's state files of ``staging`` (Tune's driver staging folder)."""
    import pickle

    states = sorted(staging.glob(_STATE_FILES[0]))
    if not states:
        return False
    session = _session(states[-1].name)
    files = {f.name: f.read_bytes() for f in _state_files(staging) if _session(f.name) == session}
    try:
        json.loads(files[states[-1].name])
    except ValueError:
        return False
    target = _state_snapshot_path(exp_dir)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps({"session": session, "files": files}))
    os.replace(tmp, target)
    return True


def repair_experiment_state(exp_dir: Path, log: Log = _print) -> None:
    """Before a resume: put back the last snapshot of Tune's state (see above), replacing what a killed
    driver left in ``exp_dir``. Trials that finished after it are rerun by Tune under their own ids and
    replayed from their results, so nothing is evaluated twice. With no snapshot and an unreadable
    state (the driver died before its first step), the stage is moved aside and starts over."""
    import pickle

    states = sorted(exp_dir.glob(_STATE_FILES[0]))
    damaged = bool(states) and not _parses(states[-1])
    try:
        snapshot = pickle.loads(_state_snapshot_path(exp_dir).read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError):
        snapshot = None
    if snapshot is None:
        if damaged:
            aside = exp_dir.with_name(f"{exp_dir.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            exp_dir.rename(aside)
            log(f"[{exp_dir.name}] Tune's state is unreadable and has no snapshot; moved to {aside.name}, "
                "starting this stage over")
        return
    for f in _state_files(exp_dir):  # state of a later session that never got as far as a snapshot
        if _session(f.name) > snapshot["session"]:
            f.unlink()
    for name, data in snapshot["files"].items():
        (exp_dir / name).write_bytes(data)
    if damaged:
        log(f"[{exp_dir.name}] {states[-1].name} was cut short by the killed driver; "
            "restored its last complete copy")


class StateSnapshots(tune.Callback):
    """Snapshots Tune's state after every step in which a trial changed status or reported."""

    def __init__(self, exp_dir: Path) -> None:
        self.exp_dir, self.seen = Path(exp_dir), None

    def on_step_end(self, iteration, trials, **info):
        if not trials:
            return
        seen = tuple((t.trial_id, t.status, len(t.last_result or {})) for t in trials)
        if seen == self.seen:
            return
        storage = getattr(trials[0], "storage", None)  # Tune's StorageContext (Ray >= 2.7)
        staging = Path(getattr(storage, "experiment_driver_staging_path", self.exp_dir))
        if snapshot_experiment_state(staging, self.exp_dir):
            self.seen = seen


class Progress(tune.Callback):
    """One line per finished trial: its score and the best so far."""

    def __init__(self, stage: str, total: int) -> None:
        self.stage, self.total, self.best = stage, total, math.inf

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(METRIC, math.nan)
        others = [t.last_result[METRIC] for t in trials
                  if t is not trial and t.last_result and METRIC in t.last_result]
        self.best = min([self.best, value, *others])  # restored trials count too
        done = 1 + len(others)
        last_t = max((int(k[len("accuracy_t"):]) for k in result if k.startswith("accuracy_t")), default=0)
        flag = "  DIVERGED" if result.get("diverged") else ""
        print(f"[{self.stage}] trial {done}/{self.total}  mean_ce {value:.4f}  "
              f"acc_t{last_t} {result.get(f'accuracy_t{last_t}', math.nan):.3f}  best {self.best:.4f}  "
              f"({result.get('eval_seconds', math.nan):.2f}s){flag}", file=sys.stdout, flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        print(f"[{self.stage}] trial {trial.trial_id} was lost (its worker or node died); retrying it "
              f"(failure {trial.num_failures} of at most {MAX_FAILURES})", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[{self.stage}] trial {trial.trial_id} failed (see {trial.local_path})", flush=True)
