"""A promoted configuration in MLflow: a nested run under the search's run, with per-timestep
metrics (``step=t``), the CSV of every number and the stage plots."""

from __future__ import annotations

import math
import time

from mlflow.entities import Metric, Param

from pctune.tracking.search import open_tracker
from pctune.tracking.store import resolve_tracking_uri


def log_promotion(job, cand, outputs: dict) -> str:
    import json

    state = job.run_dir / "tracking.json"
    uri = resolve_tracking_uri(job.tracking.tracking_uri or (json.loads(state.read_text())["uri"]
                                                             if state.is_file() else None))
    tracker = open_tracker(job, uri)
    client = tracker.client
    tags = {"mlflow.parentRunId": tracker.parent_id, "pctune.promotion": cand.name, "pctune.trial_id_promoted":
            cand.trial, "mlflow.runName": f"promotion-{cand.name}"}
    run = client.create_run(tracker.experiment_id, tags=tags)
    now = int(time.time() * 1000)
    params = [Param(k, repr(v)) for k, v in _hparam_params(cand.hparams).items()]
    params.append(Param("stages", ",".join(outputs)))
    metrics = [Metric(name, value, now, step) for out in outputs.values() for name, value, step in out["metrics"]
               if math.isfinite(value)]
    for i in range(0, max(len(metrics), 1), 900):
        client.log_batch(run.info.run_id, metrics=metrics[i:i + 900], params=params if i == 0 else [])
    for out in outputs.values():
        for path in out["artifacts"]:
            client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _hparam_params(hp) -> dict[str, float]:
    return {f"pcoder{n}.{field}": value for n, triple in enumerate(hp.triples(), start=1)
            for field, value in zip(("beta", "lambda", "alpha"), triple, strict=True)}
