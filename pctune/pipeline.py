"""Orchestration: a search, tracked, from the first trial to the promoted winners.

``search`` runs the job's search with every finished trial logged to MLflow as it finishes, then
``sync`` (what MLflow missed, the summary, the champion), then, when the job asks for it, ``promote``.
This is the one module that joins the layers: the search (:mod:`pctune.search`) and the evaluation
stages (:mod:`pctune.evaluate`) know nothing of MLflow, and :mod:`pctune.tracking` takes plain values.
Which configuration won is always :meth:`pctune.search.rundir.RunDir.ranking`'s answer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pctune.errors import Interrupted, PctuneError, write_error
from pctune.lineage import with_local_weights
from pctune.search.identity import LINEAGE_KEY
from pctune.search.job import Job
from pctune.search.objectives import Objective
from pctune.search.prepare import load_job_model
from pctune.search.rundir import PROMOTION, SWEEP_CSV, SWEEP_PNG, Entry, RunDir, front_members, rank
from pctune.search.runlock import run_lock
from pctune.tracking.runs import SearchTracker
from pctune.tracking.store import check_reachable, resolve_tracking_uri, ui_command
from pctune.utils import Log, first_line, print_line

#: the parent run's tag that says whether the search ran to its end ("true") or not ("false")
COMPLETE_SEARCH_TAG = "pctune.search_complete"


def search(job: Job, log: Log = print_line) -> dict[str, Any]:
    """``pctune search``: check the tracking store first, log trials as they finish, then sync the
    summary and the champion, then promote (if the job's ``[promotion]`` says so), holding the run
    directory's lock throughout."""
    from pctune.search.claim import search_lock

    uri = resolve_tracking_uri(job.tracking.tracking_uri)
    check_reachable(uri)
    with search_lock(job, log):
        return _search(with_local_weights(job, uri, log, new_search=not job.resume), uri, log)


def _search(job: Job, uri: str, log: Log) -> dict[str, Any]:
    from pctune.search.driver import run_search
    from pctune.tracking.search import MlflowTrialLogger

    # A server that dies mid-search must cost seconds, not MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    warn = _tracking_warning(job, log)
    logger = MlflowTrialLogger(lambda: open_tracker(job, uri), warn)
    try:
        summary = run_search(job, log=log, callbacks=[logger])
    except (Interrupted, KeyboardInterrupt) as exc:  # a signal: the parent is KILLED, `--resume` reopens it
        _mark_killed(logger.tracker, log)
        if isinstance(exc, Interrupted):
            raise
        raise Interrupted(f"the search of {job.name} stopped") from None  # outside Tune's trials
    except Exception as exc:  # a full disk, say: the parent FAILED, not left RUNNING; `--resume` reopens it
        _mark_killed(logger.tracker, log, "FAILED")
        _name_the_folder(exc, job.run_dir)
        raise
    try:
        synced = sync(job, uri, log=log)
    except Interrupted as exc:  # `--resume` finds every trial done and syncs again
        raise Interrupted(exc.stopped) from None
    except Exception as exc:
        if write_error(exc):  # a full disk is the command's error, not an MLflow warning
            raise
        logger.fail(exc)
        return summary
    log(f"MLflow: experiment {experiment_name(job)!r} at {uri}; browse with: "
        f"{ui_command(uri, synced['experiment_id'])}")
    if job.promotion.stages and job.promotion.auto:
        try:
            summary["promotion"] = promote(job, log=log)
        except Interrupted as exc:  # `--resume` finds the search done and promotes again, skipping what finished
            raise Interrupted(exc.stopped) from None
    return summary


def _name_the_folder(exc: Exception, run_dir) -> None:
    """A write that failed with no file named (Ray Tune's result files, kept open, fail on flush) is
    named by the run directory it was writing into."""
    if isinstance(exc, OSError) and exc.filename is None and write_error(exc):
        raise OSError(exc.errno, exc.strerror, str(run_dir)) from exc


def _mark_killed(tracker: SearchTracker | None, log: Log, status: str = "KILLED") -> None:
    """An interrupted search's parent run is KILLED (a failed one FAILED), not left RUNNING (``--resume``
    reopens it)."""
    if tracker is None:
        return
    try:
        tracker.finish(status)
    except Exception as exc:  # the server may be what is going away
        log(f"warning: could not mark the MLflow run as killed ({first_line(exc)[:200]})")


def _tracking_warning(job: Job, log: Log) -> Log:
    def warn(reason: str) -> None:
        log(f"warning: MLflow logging failed ({reason}); results stay in the Tune experiment: "
            f"run `pctune sync {job.name}` once the server is back")

    return warn


def experiment_name(job: Job) -> str:
    return job.tracking.experiment or job.name


def open_tracker(job: Job, uri: str, objective: Objective | None = None) -> SearchTracker:
    """The tracker of ``job``'s search, its parent run started (or found again); ``objective``: the
    search's, as the run directory records it (read from it when not given)."""
    run_dir = RunDir(job.run_dir)
    identity = run_dir.tracking_identity(uri, experiment_name(job))
    if objective is None:
        objective = run_dir.job(job).kinds.objective
    tracker = SearchTracker(uri, identity["experiment"], identity["search_id"],
                            objective_metrics=objective.reported())
    tracker.start(job.name, _parent_params(job, run_dir))
    return tracker


def _parent_params(job: Job, run_dir: RunDir) -> dict[str, Any]:
    record = run_dir.job_record()
    return {"job": job.name, "model": record.get("model", job.model.name), "sampler": job.search.sampler,
            "seed": job.search.seed, "strategy": job.search.strategy, "num_samples": job.search.num_samples,
            "num_images": record.get("num_images", job.data.num_images), "sigma": job.objective.sigma,
            "timesteps": job.objective.timesteps, "objective": job.objective.kind, "data_source": job.data.source,
            "dataset_digest": record.get("dataset_digest", "unknown"), "space": record.get("space", ""),
            "unreadable_images": len(record.get("unreadable_images", [])), **_lineage_params(record)}


def _lineage_params(record: dict[str, Any]) -> dict[str, Any]:
    """Feedback weights named by MLflow: the URI the job gave and what it resolved to."""
    lineage = record.get(LINEAGE_KEY) or {}
    names = {"uri": "feedback_weights", "pinned": "feedback_weights_resolved", "version": "feedback_weights_version",
             "run_id": "feedback_weights_run_id"}
    return {param: lineage[key] for key, param in names.items() if lineage.get(key)}


# -- sync -------------------------------------------------------------------------------------------
def sync(job: Job, uri: str | None = None, log: Log = print_line, register_incomplete: bool = False) -> dict[str, Any]:
    """``pctune sync``: upload what MLflow is missing of ``job``'s search: trials, the summary, the
    champion, holding the run directory's lock. A search that did not run to its end (killed, stopped)
    leaves its parent run KILLED and tagged ``pctune.search_complete = false``, and registers no champion
    unless ``register_incomplete``."""
    run_dir = RunDir(job.run_dir)
    run_dir.require_search(job.name)
    uri = uri or resolve_tracking_uri(job.tracking.tracking_uri or run_dir.tracking_uri())
    check_reachable(uri)
    with run_lock(run_dir.path, f"pctune sync {job.name}", log):
        return _sync(with_local_weights(job, uri, log, new_search=False), run_dir, uri, log, register_incomplete)


def _sync(job: Job, run_dir: RunDir, uri: str, log: Log, register_incomplete: bool) -> dict[str, Any]:
    objective = run_dir.job(job).kinds.objective  # the job as the search ran it (read back once)
    tracker = open_tracker(job, uri, objective)
    try:
        return _sync_into(job, objective, tracker, run_dir, log, register_incomplete)
    except KeyboardInterrupt:
        _mark_killed(tracker, log)
        raise Interrupted(f"the sync of {job.name} stopped (what reached MLflow is kept)", rerun=True) from None
    except Exception:  # a full disk, say: the parent is not left RUNNING
        _mark_killed(tracker, log, "FAILED")
        raise


def _sync_into(job: Job, objective: Objective, tracker: SearchTracker, run_dir: RunDir, log: Log,
               register_incomplete: bool) -> dict[str, Any]:
    from pctune.tracking.summary import log_search_summary

    complete = run_dir.search_complete()
    tracker.client.set_tag(tracker.parent_id, COMPLETE_SEARCH_TAG, str(complete).lower())
    entries = run_dir.entries()  # read once: the trials to log and the winner come from the same entries
    trials = [e for e in entries if e.kind == "trial"]
    added = tracker.log_missing((t.trial_id, t.config, t.metrics, t.curve) for t in trials)
    log(f"MLflow: {added} trial runs added, {len(trials) - added} already there")
    summary: dict[str, Any] = {}
    metric, mode = run_dir.goal()
    best = next(iter(rank(entries, run_dir.front(), (metric, mode))), None)
    scored = [t for t in trials if t.full_fidelity]  # the plots and importances compare final scores only
    if scored:
        frame = pd.DataFrame([{"trial_id": t.trial_id, **t.config, **t.metrics} for t in scored])
        summary = log_search_summary(tracker, frame, _baselines(run_dir), run_dir.register("summary"),
                                     best={**best.metrics, **best.params} if best else None, score=metric,
                                     mode=mode)
    sweep = [run_dir / name for name in (SWEEP_CSV, SWEEP_PNG) if (run_dir / name).is_file()]
    if sweep:  # a single-pcoder grid sweep: its table and heatmaps (written by the search's results)
        tracker.log_summary({}, artifacts=sweep)
    axes = objective.tradeoff_axes()
    if axes is not None:  # a robust objective of two or more conditions
        _log_tradeoff(tracker, entries, objective, axes, run_dir, best)
    if best is None:
        log("MLflow: no champion registered: no configuration finished without diverging"
            + (" and meeting every constraint" if objective.constraint_keys() else ""))
    elif complete or register_incomplete:
        register(job, tracker, best, log, objective)
    if not complete:
        _report_incomplete(job, run_dir, best, register_incomplete, log)
    tracker.finish("FINISHED" if complete else "KILLED")
    return {"added": added, "trials": len(trials), "parent_run_id": tracker.parent_id,
            "experiment_id": tracker.experiment_id, "complete": complete, **summary}


def _report_incomplete(job: Job, run_dir: RunDir, best: Entry | None, registered: bool, log: Log) -> None:
    """The log line of a sync of a search that did not run to its end."""
    ended, expected = run_dir.search_progress()
    if registered and best is not None:
        champion = "its best so far registered as @champion (--register-incomplete)"
    elif best is not None:
        champion = (f"no @champion registered (`pctune sync {job.name} --register-incomplete` would register its "
                    f"best so far, {best.kind} {best.key})")
    else:
        champion = "no @champion registered"
    log(f"MLflow: the search of {job.name} is incomplete ({ended} of {expected} trials finished): parent run "
        f"KILLED, tagged {COMPLETE_SEARCH_TAG}=false; {champion}; `pctune search {job.name} --resume` finishes it")


def _log_tradeoff(tracker: SearchTracker, entries: list[Entry], objective, axes: tuple[str, str], run_dir: RunDir,
                  best: Entry | None) -> None:
    """The trade-off of a robust search on the parent run: mean CE under the first two objectives
    (the Pareto ones, else the first two conditions: ``axes``), its front, the references."""
    from pctune.tracking.tradeoff import log_tradeoff

    on_front = front_members(entries, axes)  # among the finished configurations meeting the constraints
    shown = [e for e in entries if e.full_fidelity and not e.diverged and axes[0] in e.metrics]
    points = pd.DataFrame([{"kind": e.kind, "name": e.name, "x": float(e.metrics[axes[0]]),
                            "y": float(e.metrics[axes[1]]), "feasible": e.feasible, "front": id(e) in on_front}
                           for e in shown])
    champion = {"rule": objective.rule()}
    if best is not None and objective.constraint_keys():
        champion["feasible"] = str(best.feasible)
    log_tradeoff(tracker, points, axes, run_dir.register("summary"), champion)


def _baselines(run_dir: RunDir) -> dict[str, dict]:
    """The reference scores the summary shows beside the best: feedforward (as "baseline") and default."""
    names = {"feedforward": "baseline", "default": "default"}
    return {names[name]: ref["metrics"] for name, ref in run_dir.references().items() if name in names}


def register(job: Job, tracker: SearchTracker, best: Entry, log: Log, objective: Objective | None = None) -> None:
    """Register ``best`` as the ``champion`` of the model named after the job (once per winner);
    ``objective``: the search's (read back from the run directory when not given)."""
    from pctune.models.registry import get_spec
    from pctune.tracking.champion import register_champion

    run = tracker.client.get_run(tracker.parent_id)
    if run.data.tags.get("pctune.champion_trial") == best.key:
        return
    _spec, net = load_job_model(job, log=lambda _m: None)
    backbone = job.model.backbone_weights
    if job.model.is_builtin_demo:
        from pctune.data.demo import ensure_demo_model

        backbone = ensure_demo_model(log=lambda _m: None)["backbone"]
    version = register_champion(tracker.uri, tracker.parent_id, net, best.hparams, model_name=job.name,
                                spec_path=get_spec(job.model.name).source, timesteps=job.objective.timesteps,
                                pretrained=job.model.pretrained, backbone_weights=backbone,
                                backbone=job.model.backbone)
    tracker.client.set_tag(tracker.parent_id, "pctune.champion_trial", best.key)
    if objective is None:  # the job as the search ran it
        objective = RunDir(job.run_dir).job(job).kinds.objective
    if objective.rule() is not None:  # which rule chose this version
        tracker.client.set_model_version_tag(job.name, version, "pctune.champion_rule", objective.rule())
    metric = objective.metric
    log(f"MLflow: registered model {job.name!r} version {version} as @champion ({best.kind} {best.key}, "
        f"{metric} {best.score(metric):.4f})")


# -- promotion --------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """A configuration chosen for promotion: ``name`` "rank1", "rank2", ...; ``key`` its trial id (or
    "combination")."""

    name: str
    key: str
    entry: Entry


def candidates(job: Job, top_k: int) -> list[Candidate]:
    """The ``top_k`` best configurations of the job's search, by the one ranking."""
    run_dir = RunDir(job.run_dir)
    run_dir.require_search(job.name)
    ranking = run_dir.ranking()[:top_k]
    if not ranking:
        raise PctuneError(f"no finished trial in {job.run_dir} to promote")
    return [Candidate(f"rank{i}", e.key, e) for i, e in enumerate(ranking, start=1)]


def promote(job: Job, top_k: int | None = None, stages: list[str] | None = None,
            log: Log = print_line) -> dict[str, Any]:
    """``pctune promote``: the k best configurations through the job's promotion stages, each into
    ``<run dir>/promotion/<rankN>/<stage>/`` and one nested MLflow run per configuration (holding the
    run directory's lock)."""
    stages = list(stages if stages is not None else job.promotion.stages)
    if not stages:
        raise PctuneError(f"{job.source}: no promotion stages (set [promotion] stages or pass --stages)")
    unknown = [s for s in stages if s not in job.promotion.settings]
    if unknown:
        raise PctuneError(f"--stages: unknown stage {unknown[0]!r} (known: {', '.join(job.promotion.settings)})")
    RunDir(job.run_dir).require_search(job.name)
    stopped = f"the promotion of {job.name} stopped (finished shards are kept in {job.run_dir / PROMOTION})"
    with run_lock(job.run_dir, f"pctune promote {job.name}", log), _stops_as_interrupted(stopped):
        uri = resolve_tracking_uri(job.tracking.tracking_uri or RunDir(job.run_dir).tracking_uri())
        return _promote(with_local_weights(job, uri, log, new_search=False), top_k, stages, log)


def _promote(job: Job, top_k: int | None, stages: list[str], log: Log) -> dict[str, Any]:
    from pctune.evaluate.stages import run_stage, stage_images

    chosen = candidates(job, top_k or job.promotion.top_k)
    _, net = load_job_model(job, log=log)
    root = RunDir(job.run_dir).register(PROMOTION)
    summary: dict[str, Any] = {}
    for cand in chosen:
        metric = RunDir(job.run_dir).goal()[0]
        log(f"promotion: {cand.name} ({cand.entry.kind} {cand.key}, {metric} {cand.entry.score(metric):.4f}): "
            f"{', '.join(stages)}")
        outputs = {}
        for stage in stages:
            settings = job.promotion.settings[stage]
            with _stops_as_interrupted(f"the promotion of {job.name} stopped in {cand.name} {stage} (finished "
                                       f"shards are kept in {root / cand.name / stage})"):
                images = stage_images(stage, settings, job.data.source, job.data.path, net, job.data.workers)
                outputs[stage] = run_stage(settings, net, cand.entry.hparams, images, root / cand.name / stage, log)
            log(f"promotion: {cand.name} {stage}:\n{outputs[stage].brief}")
        (root / cand.name / "hparams.toml").write_text(cand.entry.hparams.to_toml())
        summary[cand.name] = {"trial": cand.key, "mean_ce": cand.entry.mean_ce, "metric": metric,
                              metric: cand.entry.score(metric), "stages": stages, "dir": str(root / cand.name)}
        _track_promotion(job, cand, outputs, log)
    return summary


@contextlib.contextmanager
def _stops_as_interrupted(stopped: str) -> Iterator[None]:
    """Ctrl-C or SIGTERM inside: :class:`Interrupted` saying ``stopped``; running the same command again
    continues (every stage skips the shards that have a result file)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(stopped, rerun=True) from None


def _track_promotion(job: Job, cand: Candidate, outputs: dict, log: Log) -> None:
    """One nested MLflow run per promoted configuration (a failure is a warning)."""
    from pctune.tracking.promotion import log_promotion

    try:
        uri = resolve_tracking_uri(job.tracking.tracking_uri or RunDir(job.run_dir).tracking_uri())
        identity = RunDir(job.run_dir).tracking_identity(uri, experiment_name(job))
        tracker = SearchTracker(uri, identity["experiment"], identity["search_id"])
        before = tracker.client.get_run(tracker.parent_id).info.status if tracker.parent_id else "FINISHED"
        tracker.start(job.name, _parent_params(job, RunDir(job.run_dir)))
        try:
            log_promotion(tracker, cand.name, cand.key, cand.entry.params, list(outputs),
                          [m for out in outputs.values() for m in out.metrics],
                          [a for out in outputs.values() for a in out.artifacts])
        finally:  # the search's parent run keeps the status it had (start() reopened it), not RUNNING
            tracker.finish("FINISHED" if before == "RUNNING" else before)
    except Exception as exc:
        log(f"warning: MLflow logging of the promotion failed ({first_line(exc)[:200]}); results are in "
            f"{job.run_dir}")
