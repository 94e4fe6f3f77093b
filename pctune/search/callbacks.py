"""Ray Tune callbacks of a search: one progress line per trial, and Tune-state snapshots."""

from __future__ import annotations

import math
from pathlib import Path

from ray import tune

from pctune.search.objective import METRIC
from pctune.search.tune_state import snapshot

#: A trial whose worker or node dies is rerun (same trial id, same config) up to this many times. A
#: diverging trial never raises (it reports a finite penalty), so only real failures are retried.
MAX_FAILURES = 3


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
        if snapshot(staging, self.exp_dir):
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
              f"({result.get('eval_seconds', math.nan):.2f}s){flag}", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        print(f"[{self.stage}] trial {trial.trial_id} was lost (its worker or node died); retrying it "
              f"(failure {trial.num_failures} of at most {MAX_FAILURES})", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[{self.stage}] trial {trial.trial_id} failed (see {trial.local_path})", flush=True)
