"""The run structure of a search in MLflow.

- one parent run per search: params (job, model, sampler, seed, dataset digest, ...), tags
  ``pctune.job``, ``pctune.version``, ``pctune.git_commit``; after the search, ``best_mean_ce``,
  ``baseline_mean_ce``, ``default_mean_ce``, the leaderboard CSV and the summary plots;
- one nested child run per trial: params ``pcoder{n}.beta``, ``pcoder{n}.lambda``, ``pcoder{n}.alpha``,
  metric ``mean_ce`` at step = images seen (a curve: the running score at each report), ``num_images``
  and ``total_images``, and ``ce``, ``accuracy`` and ``recon_error_pc{n}`` at step t for t = 0..T; tag
  ``pctune.stopped_early`` ("true" when a scheduler stopped the trial before its last image: its
  scores cover ``num_images`` images only); with ``objective.kind = "cam_iou"`` also ``cam_iou``,
  ``cam_iou_rel`` and ``cam_iou_t{t}``; tag ``pctune.trial_id`` makes logging idempotent
  (``sync`` uploads only what is missing).
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from pctune.errors import PctuneError
from pctune.metrics import FEASIBLE, METRIC, is_scalar_metric, step_metric
from pctune.pc.hyperparameters import PARAM_PATTERN
from pctune.utils import chunks, first_line

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "pctune.trial_id"
SEARCH_TAG = "pctune.search_id"
JOB_TAG = "pctune.job"
COMPLETE_TAG = "pctune.complete"  # set by a child run's last write
FEASIBLE_TAG = "pctune.feasible"
STOPPED_TAG = "pctune.stopped_early"
def trial_metrics(result: Mapping[str, Any], curve: Iterable[tuple[int, float]] = (),
                  extra: Iterable[str] = ()) -> list[tuple[str, float, int]]:
    """(name, value, step) for a trial's result: ``mean_ce`` at step = images seen (0 when the result
    does not say) and at each (images seen, mean_ce) point of ``curve``, and ``ce_t3`` ->
    (``ce``, value, 3), ``accuracy_t3``, ``recon_error_pc2_t3`` -> (``recon_error_pc2``, value, 3); a
    robust objective's ``ce_clean_t3`` -> (``ce_clean``, value, 3), ``mean_ce_clean``,
    ``constraint_clean_accuracy`` and ``feasible`` at step 0; the ``cam_iou`` objective's ``cam_iou``,
    ``cam_iou_rel`` and ``cam_iou_t{t}`` at step 0; ``extra``: an objective's own metrics, at step 0
    (names and their classes: :mod:`pctune.metrics`)."""
    seen = int(result.get("num_images", 0) or 0)
    metrics = [(METRIC, float(value), int(step)) for step, value in curve if int(step) != seen]
    for key, value in result.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        at_step = step_metric(key)
        if at_step:
            metrics.append((at_step[0], float(value), at_step[1]))
        elif key == METRIC:
            metrics.append((key, float(value), seen))
        elif is_scalar_metric(key, extra):
            metrics.append((key, float(value), 0))
    return metrics


def trial_params(config: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in config.items() if PARAM_PATTERN.match(k)}


def log_in_batches(client: MlflowClient, run_id: str, metrics: list[Metric], params: list[Param]) -> None:
    """Metrics in batches MLflow accepts (it caps a batch at 1000 entries), the params with the first."""
    for i, batch in enumerate(chunks(metrics, 900)):
        client.log_batch(run_id, metrics=list(batch), params=params if i == 0 else [])


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


class SearchTracker:
    """Logs one search to MLflow. Every method is safe to call again after a crash or a resume."""

    def __init__(self, uri: str, experiment: str, search_id: str, objective_metrics: Iterable[str] = ()) -> None:
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.search_id = search_id
        self.objective_metrics = tuple(objective_metrics)  # an objective's own names, logged at step 0
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, tags={"mlflow.experimentKind": "custom_model_development"})  # the UI's runs view
        except Exception as exc:  # MLflow raises its own and requests' exception types
            raise PctuneError(f"cannot use MLflow experiment {experiment!r} at {uri}: {first_line(exc)}") from exc
        self.parent_id = self._find_parent()

    # -- the parent run ---------------------------------------------------------------------------
    def _find_parent(self) -> str | None:
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{SEARCH_TAG}` = '{self.search_id}'",
                                       max_results=1)
        return runs[0].info.run_id if runs else None

    def start(self, job_name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
        """Create the parent run, or reuse the one this search already has (resume, sync)."""
        if self.parent_id is None:
            from pctune import __version__

            all_tags = {SEARCH_TAG: self.search_id, JOB_TAG: job_name, "pctune.version": __version__,
                        "pctune.git_commit": git_commit(), "mlflow.runName": f"search-{job_name}",
                        **(tags or {})}
            run = self.client.create_run(self.experiment_id, tags=all_tags)
            self.parent_id = run.info.run_id
            self.client.log_batch(self.parent_id, params=[Param(k, str(v)) for k, v in params.items()])
        elif self.client.get_run(self.parent_id).info.status != "RUNNING":
            self.client.update_run(self.parent_id, status="RUNNING")  # resumed after a kill, or synced again
        return self.parent_id

    # -- trials ---------------------------------------------------------------------------------------
    def logged_trials(self) -> set[str]:
        """Trial ids that have a complete child run under this search. Children left incomplete by a
        server that failed mid-write are deleted, so that they are logged again, once."""
        ids, token = set(), None
        while True:
            page = self.client.search_runs([self.experiment_id],
                                           filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}'",
                                           max_results=1000, page_token=token)
            for run in page:
                trial_id = run.data.tags.get(TRIAL_TAG)
                if trial_id and run.data.tags.get(COMPLETE_TAG) == "true" and trial_id not in ids:
                    ids.add(trial_id)
                elif trial_id:
                    self.client.delete_run(run.info.run_id)
            token = page.token
            if not token:
                return ids

    def log_trial(self, trial_id: str, config: Mapping[str, Any], result: Mapping[str, Any],
                  name: str | None = None, curve: Iterable[tuple[int, float]] = ()) -> str:
        """One nested child run for a finished trial (``curve``: its (images seen, mean_ce) reports)."""
        if self.parent_id is None:
            raise RuntimeError("start() the search run first")
        tags = {PARENT_TAG: self.parent_id, TRIAL_TAG: trial_id, "mlflow.runName": name or trial_id}
        if result.get("diverged"):
            tags["pctune.diverged"] = "true"
        tags[STOPPED_TAG] = "false" if result.get("final", 1.0) else "true"
        if FEASIBLE in result:  # a robust objective with constraints
            tags[FEASIBLE_TAG] = "true" if result[FEASIBLE] else "false"
        run = self.client.create_run(self.experiment_id, tags=tags)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v, step in trial_metrics(result, curve, self.objective_metrics)
                   if math.isfinite(v)]
        params = [Param(k, repr(v)) for k, v in trial_params(config).items()]
        log_in_batches(self.client, run.info.run_id, metrics, params)
        self.client.set_terminated(run.info.run_id, "FAILED" if result.get("diverged") else "FINISHED")
        self.client.set_tag(run.info.run_id, COMPLETE_TAG, "true")
        return run.info.run_id

    def log_missing(self, trials: Iterable[tuple]) -> int:
        """Log the (trial_id, config, result) or (trial_id, config, result, curve) tuples that have no
        child run yet; return how many."""
        done = self.logged_trials()
        count = 0
        for trial_id, config, result, *curve in trials:
            if trial_id not in done:
                self.log_trial(trial_id, config, result, curve=curve[0] if curve else ())
                done.add(trial_id)
                count += 1
        return count

    # -- the summary ----------------------------------------------------------------------------------
    def log_summary(self, metrics: Mapping[str, float], params: Mapping[str, Any] | None = None,
                    artifacts: Iterable[str | Path] = ()) -> None:
        """Metrics such as best/baseline/default mean CE, the best params, and artifact files."""
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.parent_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))],
            tags=[RunTag(f"best.{k}", str(v)) for k, v in (params or {}).items()],
        )
        for path in artifacts:
            self.client.log_artifact(self.parent_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_id, status)
