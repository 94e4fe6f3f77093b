"""A promoted configuration in MLflow: one nested run under the search's run, with its stages'
metrics (stepped by timestep) and artifacts."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from mlflow.entities import Metric, Param

from pctune.tracking.runs import PARENT_TAG, SearchTracker, log_in_batches


def log_promotion(tracker: SearchTracker, name: str, promoted_key: str, params: Mapping[str, float],
                  stages: Iterable[str], metrics: Iterable[tuple[str, float, int]],
                  artifacts: Iterable[str | Path]) -> str:
    """Log one promoted configuration (``name`` e.g. "rank1"; ``promoted_key`` its trial id, or
    "combination") with (name, value, step) metrics; returns the run id."""
    client = tracker.client
    tags = {PARENT_TAG: tracker.parent_id, "pctune.promotion": name, "pctune.trial_id_promoted": promoted_key,
            "mlflow.runName": f"promotion-{name}"}
    run = client.create_run(tracker.experiment_id, tags=tags)
    now = int(time.time() * 1000)
    all_params = [Param(k, repr(v)) for k, v in params.items()] + [Param("stages", ",".join(stages))]
    log_in_batches(client, run.info.run_id, [Metric(k, v, now, step) for k, v, step in metrics if math.isfinite(v)],
                   all_params)
    for path in artifacts:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id
