"""A search, tracked: the Ray Tune callback that logs every finished trial as it finishes, the summary
and the champion at the end, and ``sync``, which uploads whatever a failed server missed.

Ray Tune's experiment folders stay the source of truth: a tracking server that goes away mid-search
costs no result. Trials it missed are logged by ``pctune sync JOB`` (or the next ``--resume``),
exactly once each: every child run carries its trial id, and a child is counted only once its last
write (the ``pctune.complete`` tag) went through; an incomplete one is deleted and logged again.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from pctune.errors import PctuneError
from pctune.tracking.runs import SearchTracker
from pctune.tracking.store import check_reachable, resolve_tracking_uri, ui_command
from pctune.tracking.summary import log_search_summary

STATE_FILE = "tracking.json"


def tracking_state(run_dir: Path, uri: str, experiment: str) -> dict[str, str]:
    """The search's tracking identity, kept in its run directory so resume and sync find the same
    parent run (a new search of the job, after ``--overwrite``, gets a new one)."""
    path = run_dir / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {"search_id": uuid.uuid4().hex}
    state.update(uri=uri, experiment=experiment)
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))
    return state


class MlflowTrialLogger(tune.Callback):
    """Logs each finished trial as a nested run under the search's parent run. A failure to log is a
    warning, not an error: the result stays in the Tune experiment for ``pctune sync``."""

    def __init__(self, job, uri: str, log=print) -> None:
        self.job = job
        self.uri = uri
        self.log = log
        self.tracker: SearchTracker | None = None
        self.warned = False

    def setup(self, **info: Any) -> None:
        try:
            self.tracker = open_tracker(self.job, self.uri)
        except Exception as exc:
            self._warn(exc)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        if self.tracker is None or not trial.last_result:
            return
        try:
            self.tracker.log_trial(trial.trial_id, trial.config, trial.last_result, name=trial_name(trial))
        except Exception as exc:
            self._warn(exc)

    def _warn(self, exc: BaseException) -> None:
        self.tracker = None  # stop trying: each attempt would wait on a dead server; sync catches up
        if not self.warned:
            self.warned = True
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.log(f"warning: MLflow logging failed ({first[:200]}); results stay in the Tune experiment: "
                     f"run `pctune sync {self.job.name}` once the server is back")


def trial_name(trial) -> str:
    return f"trial-{trial.trial_id}"


def open_tracker(job, uri: str) -> SearchTracker:
    """The tracker of ``job``'s search, its parent run started (or found again)."""
    run_dir = job.run_dir
    experiment = job.tracking.experiment or job.name
    state = tracking_state(run_dir, uri, experiment)
    tracker = SearchTracker(uri, experiment, state["search_id"])
    tracker.start(job.name, _parent_params(job, run_dir))
    return tracker


def _parent_params(job, run_dir: Path) -> dict[str, Any]:
    record = json.loads((run_dir / "job.json").read_text()) if (run_dir / "job.json").is_file() else {}
    params = {"job": job.name, "model": record.get("model", job.model.name), "sampler": job.search.sampler,
              "seed": job.search.seed, "strategy": job.search.strategy, "num_samples": job.search.num_samples,
              "num_images": record.get("num_images", job.data.num_images), "sigma": job.objective.sigma,
              "timesteps": job.objective.timesteps, "data_source": job.data.source,
              "dataset_digest": record.get("dataset_digest", "unknown"), "space": record.get("space", "")}
    return params


def tracked_search(job, log=print) -> dict[str, Any]:
    """``pctune search``: check the tracking server first, log trials as they finish, then the
    summary and the champion."""
    from pctune.search.driver import run_search

    uri = resolve_tracking_uri(job.tracking.tracking_uri)
    check_reachable(uri)
    # A server that dies mid-search must cost seconds, not MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    logger = MlflowTrialLogger(job, uri, log)
    summary = run_search(job, log=log, callbacks=[logger])
    try:
        sync(job, uri, log=log)
    except Exception as exc:
        logger._warn(exc)
        return summary
    log(f"MLflow: experiment {job.tracking.experiment or job.name!r} at {uri}; browse with: {ui_command(uri)}")
    if job.promotion.stages and job.promotion.auto:
        from pctune.promotion import promote

        summary["promotion"] = promote(job, log=log)
    return summary


def sync(job, uri: str | None = None, log=print) -> dict[str, Any]:
    """Upload what MLflow is missing of ``job``'s search: trials, the summary, the champion."""
    from pctune.search.results import _stages, load_trials

    run_dir = job.run_dir
    if not (run_dir / "job.json").is_file():
        raise PctuneError(f"no search of {job.name} in {run_dir} (run `pctune search {job.name}` first)")
    state_path = run_dir / STATE_FILE
    previous = json.loads(state_path.read_text()) if state_path.is_file() else {}
    uri = uri or resolve_tracking_uri(job.tracking.tracking_uri or previous.get("uri"))
    check_reachable(uri)
    tracker = open_tracker(job, uri)
    trials = [t for stage in _stages(run_dir) for t in load_trials(run_dir / stage) if t["status"] == "TERMINATED"]
    added = tracker.log_missing((t["trial_id"], t["config"], t["metrics"]) for t in trials)
    log(f"MLflow: {added} trial runs added, {len(trials) - added} already there")
    frame = pd.DataFrame([{"trial_id": t["trial_id"], **t["config"], **t["metrics"]} for t in trials])
    references = _references(run_dir)
    summary = {}
    if not frame.empty:
        summary = log_search_summary(tracker, frame, references, run_dir / "summary")
        _register(job, tracker, frame, log)
    tracker.finish()
    return {"added": added, "trials": len(trials), "parent_run_id": tracker.parent_id, **summary}


def _references(run_dir: Path) -> dict[str, dict]:
    path = run_dir / "references.json"
    if not path.is_file():
        return {}
    refs = json.loads(path.read_text())
    names = {"feedforward": "baseline"}
    return {names.get(name, name): ref["metrics"] for name, ref in refs.items() if name in ("feedforward", "default")}


def _register(job, tracker: SearchTracker, frame: pd.DataFrame, log) -> None:
    """Register the best configuration as the ``champion`` of the model named after the job (once)."""
    from pctune.search.results import row_hparams
    from pctune.tracking.champion import register_champion

    finite = frame[frame.get("diverged", 0) == 0] if "diverged" in frame else frame
    best = finite.loc[pd.to_numeric(finite["mean_ce"]).idxmin()]
    run = tracker.client.get_run(tracker.parent_id)
    if run.data.tags.get("pctune.champion_trial") == best["trial_id"]:
        return
    from pctune.models.registry import get_spec
    from pctune.search.driver import build_model

    _spec, net = build_model(job, log=lambda _m: None)
    hp = row_hparams(best)
    backbone = job.model.backbone_weights
    if job.model.is_builtin_demo:
        from pctune.data.demo import ensure_demo_model

        backbone = ensure_demo_model(log=lambda _m: None)["backbone"]
    version = register_champion(tracker.uri, tracker.parent_id, net, hp, model_name=job.name,
                                spec_path=get_spec(job.model.name).source, timesteps=job.objective.timesteps,
                                pretrained=job.model.pretrained, backbone_weights=backbone)
    tracker.client.set_tag(tracker.parent_id, "pctune.champion_trial", str(best["trial_id"]))
    log(f"MLflow: registered model {job.name!r} version {version} as @champion (trial {best['trial_id']}, "
        f"mean_ce {float(best['mean_ce']):.4f})")
