"""The search driver: Ray Tune's ``Tuner`` with Optuna as the search algorithm.

``run_search`` prepares the search once (:mod:`pctune.search.prepare`), puts the model and the arrays
its objective scores on into Ray's object store, scores the reference points and runs the Tune
experiments the job's strategy plans (:mod:`pctune.search.strategies`: one for the whole space, or one
per pcoder), writing into the run directory (:mod:`pctune.search.rundir`).
``--resume`` restores every unfinished experiment with ``Tuner.restore`` (finished trials are kept,
unfinished ones rerun) and skips finished stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.logger import JsonLoggerCallback

from pctune import interrupts
from pctune.errors import Interrupted, PctuneError
from pctune.metrics import METRIC, is_trial_metric
from pctune.pc.hyperparameters import Hyperparameters
from pctune.search.callbacks import MAX_FAILURES, EarlyStops, Progress, ResultRecord, StateSnapshots
from pctune.search.claim import claim_plan, claim_run_dir, search_lock
from pctune.search.extend import restore_tuner
from pctune.search.identity import check_resume, evaluation_arrays, fingerprint, job_record
from pctune.search.job import Job
from pctune.search.prepare import Log, Prepared, _print, check_paths, prepare
from pctune.search.raycluster import check_resources, cluster_address, connect
from pctune.search.rundir import COMBINATION, JOB, REFERENCES, RunDir, Trial, load_trials
from pctune.search.schedulers import make_scheduler, report_points
from pctune.search.searchers import make_searcher  # noqa: F401 (re-exported: tests, earlier callers)
from pctune.search.signing import state_key
from pctune.search.space import hparams_to_config
from pctune.search.strategies import STRATEGIES
from pctune.search.trainable import TrialPayload, digest_arrays, run_trial, state_arrays
from pctune.search.tune_patches import lean_fit
from pctune.search.tune_state import check_ray_version, remember_tuner_state, repair

__all__ = ["MAX_FAILURES", "SearchInterrupted", "check_resources", "connect", "evaluate_points", "run_search"]




class SearchInterrupted(Interrupted):
    """The search stopped early (Ctrl-C, SIGTERM); its state is saved and ``--resume`` continues it."""


# -- Ray ----------------------------------------------------------------------------------------
def trial_setup(prep: Prepared, data_key: str | None = None) -> TrialPayload:
    """Put the model and the noisy images into the object store (once per search; ``data_key``: their
    digest, when already computed)."""
    import ray

    state = state_arrays(prep.net)
    data = evaluation_arrays(prep)
    search = prep.job.search
    return TrialPayload(spec=prep.spec, model_key=digest_arrays(state), model_ref=ray.put(state),
                        data_key=data_key or digest_arrays(data), data_ref=ray.put(data),
                        timesteps=prep.job.objective.timesteps, batch_size=prep.job.objective.batch_size,
                        penalty=prep.penalty, checkpoint=prep.job.kinds.scheduler.checkpoints,
                        cache_gb=search.cache_gb, objective=prep.objective,
                        report_at=tuple(report_points(len(prep.labels), search.scheduler, search.grace_images,
                                                      search.reduction_factor)))


def evaluate_points(setup: TrialPayload, points: dict[str, Hyperparameters], resources: dict,
                    in_driver: bool = False) -> dict[str, dict]:
    """Score named points as plain Ray tasks (in parallel), on the same workers and caches as trials;
    ``in_driver``: one after the other in this process, with a trial's threads (:func:`points_in_driver`)."""
    import ray

    from pctune.search.trainable import evaluate_here, evaluate_task

    if in_driver:
        return {name: {"metrics": evaluate_here(setup, hp, int(resources["cpu"])), "config": hparams_to_config(hp)}
                for name, hp in points.items()}
    task = ray.remote(evaluate_task).options(num_cpus=resources["cpu"], num_gpus=resources["gpu"])
    refs = {name: task.remote(setup, hp.to_mapping()) for name, hp in points.items()}
    return {name: {"metrics": ray.get(ref), "config": hparams_to_config(points[name])}
            for name, ref in refs.items()}


def points_in_driver(job: Job) -> bool:
    """Score reference points in the driver: on a local Ray whose trials use no GPU. A Ray worker that
    ran a task is never given to an actor, so tasks there would take the idle workers Ray prestarted
    (with ``PCTUNE_PRELOAD=1``, with the trial's modules imported: :func:`pctune.search.raycluster.connect`)
    and leave the first trial to start a new worker. The driver has torch imported and the same CPU;
    a cluster's or a GPU's points run where trials run."""
    return cluster_address(job) is None and not job.search.resources["gpu"]


# -- the search ---------------------------------------------------------------------------------
def run_search(job: Job, log: Log = _print, callbacks: list | None = None) -> dict[str, Any]:
    """Run (or resume) the job's search; returns the summary written by :mod:`pctune.search.results`.

    ``callbacks``: extra Ray Tune callbacks (e.g. experiment tracking) added to every stage."""
    with search_lock(job, log):  # one owner, from the first check to the end (pctune.search.runlock)
        return _run_search(job, log, callbacks)


def _run_search(job: Job, log: Log, callbacks: list | None) -> dict[str, Any]:
    from pctune.search.results import write_results

    run_dir = RunDir(job.run_dir)
    check_paths(job)
    claim_plan(job, run_dir)  # refused before the (slow) preparation; nothing is removed yet
    prep = prepare(job, log)
    data_key = digest_arrays(evaluation_arrays(prep))
    identity = fingerprint(prep, data_key)
    if job.resume and run_dir.has_search():  # the same job, or nothing in the run directory changes
        check_resume(run_dir, prep, identity)
    check_resources(job, log)  # a local Ray's resources, before it starts
    connect(job.run.address, log)
    check_resources(job, log)  # a cluster's, once connected
    check_ray_version(log)
    state_key()  # the key that signs the Tune state: an unusable one is an error before anything is written
    claim_run_dir(job, run_dir, log)  # only after the checks: a refused search leaves no folder
    setup = trial_setup(prep, data_key)
    run_dir.write_json(JOB, job_record(prep, identity))
    expected = _expected_trials(prep)
    run_dir.record_search_state("running", expected)  # what a killed driver leaves: `sync` knows
    log(f"search: {job.name} ({_plan(prep)}, {job.search.max_concurrent_trials} at a time) on "
        f"{len(prep.labels)} images; results in {run_dir.path}")
    try:
        score_references(prep, setup, run_dir, log)
        job.kinds.strategy.run(Stages(prep, setup, run_dir, log, callbacks))
    except BaseException as exc:
        with contextlib.suppress(OSError):  # a full disk must not hide why the search stopped
            run_dir.record_search_state("stopped", expected)
        if isinstance(exc, SearchInterrupted):
            with contextlib.suppress(PctuneError):
                write_results(job, log=log)  # what finished so far
        raise
    summary = write_results(job, log=log)
    run_dir.record_search_state("finished", expected)
    return summary


def _expected_trials(prep: Prepared) -> int:
    """The trials the whole search runs (the strategy's plan: num_samples per experiment, or its grids)."""
    return prep.job.kinds.strategy.expected_trials(prep.job.search.num_samples, prep.space.num_pcoders, prep.grids)


def _plan(prep: Prepared) -> str:
    """What the search runs, for its first line."""
    objective = prep.objective
    goal = "" if objective.metric == METRIC else f", {objective.mode}imize {objective.metric}"
    return prep.job.kinds.strategy.plan(prep.job.search, prep.grids) + goal


def score_references(prep: Prepared, setup: TrialPayload, run_dir: RunDir, log: Log) -> dict:
    """The feedforward baseline and the model's presets, scored once per search."""
    refs = run_dir.references()
    if refs:
        return refs
    start = time.perf_counter()
    refs = evaluate_points(setup, reference_points(prep.net), prep.job.search.resources, points_in_driver(prep.job))
    for name, ref in refs.items():
        log(f"reference {name:12s} {_scores(prep.job, ref['metrics'])}")
    log(f"references scored in {time.perf_counter() - start:.1f}s")
    run_dir.write_json(REFERENCES, refs)
    return refs


def reference_points(net) -> dict[str, Hyperparameters]:
    """The points every search scores first: the feedforward baseline, then the model's presets."""
    return {name: net.hyperparameters(name) for name in ("feedforward", *net.presets)}


def _scores(job: Job, metrics: dict) -> str:
    """``mean_ce 0.4923``, or the objective's score first: ``cam_iou 0.2280  mean_ce 0.4923``."""
    metric = job.kinds.objective.metric
    first = "" if metric == METRIC else f"{metric} {metrics.get(metric, float('nan')):.4f}  "
    return f"{first}{METRIC} {metrics.get(METRIC, float('nan')):.4f}"


def _tuner(prep: Prepared, setup: TrialPayload, stage: str, searcher, num_samples: int,
           callbacks: list | None) -> tune.Tuner:
    """A new Tune experiment for ``stage``: ``num_samples`` trials proposed by ``searcher``."""
    job = prep.job
    metric, mode = job.kinds.objective.metric, job.kinds.objective.mode
    scheduler = make_scheduler(job.search.scheduler, job.run_dir / stage, len(prep.labels), job.search.grace_images,
                               job.search.reduction_factor, metric, mode)
    concurrent = job.search.max_concurrent_trials if job.kinds.scheduler.limits_concurrency else None
    exp_dir = job.run_dir / stage
    return tune.Tuner(
        _trainable(job, setup),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=stage, storage_path=str(job.run_dir), verbose=1 if job.run.verbose else 0,
                                  callbacks=[JsonLoggerCallback(), ResultRecord(exp_dir), EarlyStops(exp_dir),
                                             Progress(stage, num_samples, metric, mode), StateSnapshots(exp_dir),
                                             *(callbacks or [])],
                                  failure_config=tune.FailureConfig(max_failures=MAX_FAILURES)),
    )


def _trainable(job: Job, setup: TrialPayload):
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                               {"cpu": job.search.resources["cpu"], "gpu": job.search.resources["gpu"]})


def run_joint(prep: Prepared, setup: TrialPayload, log: Log, callbacks: list | None = None,
              stage: str = "joint") -> None:
    """The joint strategy's one Tune experiment (:class:`pctune.search.strategies.Joint`), whatever the
    job's strategy, under the stage name ``stage`` (the benchmarks run it)."""
    STRATEGIES["joint"].run(Stages(prep, setup, RunDir(prep.job.run_dir), log, callbacks), stage)


def _run_stage(prep: Prepared, setup: TrialPayload, stage: str, searcher: Callable[[], Any], num_samples: int,
               log: Log, callbacks: list | None = None) -> None:
    """Run (or restore and finish) the Tune experiment ``stage``: ``num_samples`` trials from ``searcher()``."""
    job = prep.job
    exp_dir = RunDir(job.run_dir).register(stage)
    # Tune may save its state in any step; pctune.search.tune_patches keeps the steps a resume needs
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # result.json only (no TensorBoard/CSV)
    before: list[Trial] = []
    if interrupts.requested():  # stopped while an earlier stage ended: start no other
        raise _stopped(job, stage, sum(1 for t in load_trials(exp_dir) if t.finished), num_samples)
    if exp_dir.exists():
        before = load_trials(exp_dir)
        setup = dataclasses.replace(setup, replay=_reported_results(before, job.kinds.objective.reported()))
        repair(exp_dir, log)  # verifies the signed state and leaves nothing else for Tune to unpickle
    if exp_dir.exists() and tune.Tuner.can_restore(str(exp_dir)):
        if _stage_finished(before, num_samples):
            log(f"[{stage}] already finished")
            return
        log(f"[{stage}] restoring {exp_dir}")
        tuner = restore_tuner(exp_dir, _trainable(job, setup), num_samples,  # a larger num_samples extends it
                              job.search.max_concurrent_trials)
    else:
        tuner = _tuner(prep, setup, stage, searcher(), num_samples, callbacks)
        remember_tuner_state(exp_dir)  # the tuner.pkl Ray just wrote: its snapshots carry and sign it
    start = time.perf_counter()
    with lean_fit():  # saves only in steps that changed a trial; trials on Ray's prestarted workers
        grid = tuner.fit()
    after = load_trials(exp_dir)
    done = sum(1 for t in after if t.finished)
    missing = num_samples - done
    log(f"[{stage}] {done} trials in {time.perf_counter() - start:.1f}s"
        + (f", {grid.num_errors} errored" if grid.num_errors else "")
        + (f" ({missing} of {num_samples} not finished)" if missing > 0 else ""))
    if not _stage_finished(after, num_samples) and (grid.num_errors == 0 or interrupts.requested()):
        raise _stopped(job, stage, done, num_samples)


def _stopped(job: Job, stage: str, done: int, num_samples: int) -> SearchInterrupted:
    return SearchInterrupted(f"the search of {job.name} stopped after {done} of {num_samples} trials ({stage})",
                             f"pctune search {_job_ref(job)} --resume")


def _job_ref(job: Job) -> str:
    """How to name the job on the command line: its name when that finds the same file."""
    from pctune.search.job import resolve_job_path

    try:
        same = resolve_job_path(job.name).resolve() == Path(job.source).resolve()
    except PctuneError:
        same = False
    return job.name if same else job.source


def _reported_results(trials: list[Trial], own: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """trial id -> the metrics it reported (not Ray Tune's additions), for every trial with a result on
    disk; ``own``: the objective's own metric names."""
    return {t.trial_id: {k: v for k, v in t.metrics.items() if is_trial_metric(k, own)} for t in trials if t.finished}


def _stage_finished(trials: list[Trial], num_samples: int) -> bool:
    # A trial folder without a result can be an orphan of a killed driver (created after the last
    # saved state, then re-created on restore), so count the finished ones only.
    return sum(1 for t in trials if t.status in ("TERMINATED", "ERROR")) >= num_samples


class Stages:
    """What a strategy (:mod:`pctune.search.strategies`) runs its search with: Tune experiments, points
    scored as plain Ray tasks, the best of a stage and the per-pcoder combination's record."""

    def __init__(self, prep: Prepared, setup: TrialPayload, run_dir: RunDir, log: Log, callbacks: list | None) -> None:
        self.prep, self.setup, self.run_dir, self.log, self.callbacks = prep, setup, run_dir, log, callbacks

    def run_stage(self, stage: str, searcher: Callable[[], Any], num_samples: int) -> None:
        _run_stage(self.prep, self.setup, stage, searcher, num_samples, self.log, self.callbacks)

    def evaluate(self, points: dict[str, Hyperparameters]) -> dict[str, dict]:
        return evaluate_points(self.setup, points, self.prep.job.search.resources, points_in_driver(self.prep.job))

    def best(self, stage: str):
        return self.run_dir.best(stage)

    def read_combination(self) -> dict | None:
        return self.run_dir.read_json(COMBINATION)

    def write_combination(self, result: dict) -> None:
        self.run_dir.write_json(COMBINATION, result)

    def scores(self, metrics: dict) -> str:
        return _scores(self.prep.job, metrics)
