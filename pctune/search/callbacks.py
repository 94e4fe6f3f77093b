"""Ray Tune callbacks of a search: one progress line per trial, Tune-state snapshots, and the record
of trials stopped early."""

from __future__ import annotations

import math
from pathlib import Path

from ray import tune

from pctune.metrics import METRIC, step_metric
from pctune.search.trials import append_result, is_final, record_early_stop
from pctune.search.tune_patches import trials_fingerprint
from pctune.search.tune_state import snapshot
from pctune.utils import Log, print_line

#: A trial whose worker or node dies is rerun (same trial id, same config) up to this many times. A
#: diverging trial never raises (it reports a finite penalty), so only real failures are retried.
MAX_FAILURES = 3


class StateSnapshots(tune.Callback):
    """Snapshots (signed) Tune's state after every step in which Tune saved it (a trial was added, paused
    or resumed: :mod:`pctune.search.tune_patches`) and at the experiment's end, after Tune's last save
    (:mod:`pctune.search.tune_state`)."""

    def __init__(self, exp_dir: Path) -> None:
        self.exp_dir, self.seen = Path(exp_dir), None

    def on_step_end(self, iteration, trials, **info):
        seen = trials_fingerprint(trials)  # the same test as Tune's saves
        if trials and seen != self.seen and self._snapshot(trials):
            self.seen = seen

    def on_experiment_end(self, trials, **info):
        if trials:
            self._snapshot(trials)

    def _snapshot(self, trials) -> bool:
        storage = getattr(trials[0], "storage", None)  # Tune's StorageContext (Ray >= 2.7)
        staging = Path(getattr(storage, "experiment_driver_staging_path", self.exp_dir))
        # where the experiment is now: a restored callback was pickled (in tuner.pkl) with the run's old place
        exp_dir = Path(getattr(storage, "experiment_fs_path", self.exp_dir))
        return snapshot(staging, exp_dir)


class ResultRecord(tune.Callback):
    """Appends every trial result to the stage's own record in the run directory
    (:func:`pctune.search.trials.append_result`), the copy that survives a driver killed while Tune
    rewrites the trial's ``result.json``."""

    def __init__(self, exp_dir: Path) -> None:
        self.exp_dir = Path(exp_dir)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        storage = getattr(trial, "storage", None)
        # where the experiment is now (a restored callback keeps the run's old place, as StateSnapshots)
        exp_dir = Path(getattr(storage, "experiment_fs_path", self.exp_dir))
        folder = getattr(storage, "trial_dir_name", None) or Path(trial.path).name
        append_result(exp_dir, folder, {**result, "config": trial.config})


class EarlyStops(tune.Callback):
    """Records the trials that completed without a final result: a scheduler stopped them early (a
    trial only returns after its last image). Tune calls this before it saves its state, so a resumed
    search knows them as done."""

    def __init__(self, exp_dir: Path) -> None:
        self.exp_dir = Path(exp_dir)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if METRIC in result and not is_final(result):
            # where the experiment is now (a restored callback keeps the run's old place, as StateSnapshots)
            exp_dir = Path(getattr(getattr(trial, "storage", None), "experiment_fs_path", self.exp_dir))
            record_early_stop(exp_dir, trial.trial_id, int(result.get("num_images", 0)))


class Progress(tune.Callback):
    """One line per finished trial: its score (or where the scheduler stopped it) and the best final
    score so far (among the configurations that meet a robust objective's constraints; a trial that
    breaks one says so). ``metric`` and ``mode``: the objective's (``mean_ce``, "min" by default).
    The lines go to ``log``: Tune pickles its callbacks into the experiment state (``tuner.pkl``) and
    restores them on ``--resume``, so it must be picklable (a module-level function, as the default)."""

    log: Log = staticmethod(print_line)  # for a Progress restored from a state pickled before it had a log

    def __init__(self, stage: str, total: int, metric: str = METRIC, mode: str = "min", log: Log = print_line) -> None:
        self.stage, self.total, self.metric, self.log = stage, total, metric, log
        self.better = min if mode == "min" else max
        self.best = math.inf if mode == "min" else -math.inf

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        value = result.get(self.metric, math.nan)
        others = [t.last_result for t in trials if t is not trial and t.status == "TERMINATED" and t.last_result]
        finals = [r[self.metric] for r in [*others, result] if self.metric in r and is_final(r)
                  and not r.get("diverged") and r.get("feasible", 1.0)]
        self.best = self.better([self.best, *finals])  # restored trials count too
        done = 1 + len(others)
        best = f"{self.best:.4f}" if math.isfinite(self.best) else "-"
        if not is_final(result):
            self.log(f"[{self.stage}] trial {done}/{self.total}  stopped at {int(result.get('num_images', 0))}/"
                     f"{int(result.get('total_images', 0))} images  {self.metric} {value:.4f}  best {best}")
            return
        last_t = max((step[1] for k in result if (step := step_metric(k)) and step[0] == "accuracy"), default=0)
        flag = "  DIVERGED" if result.get("diverged") else "  INFEASIBLE" if not result.get("feasible", 1.0) else ""
        ce = "" if self.metric == METRIC else f"  mean_ce {result.get(METRIC, math.nan):.4f}"
        self.log(f"[{self.stage}] trial {done}/{self.total}  {self.metric} {value:.4f}{ce}  "
                 f"acc_t{last_t} {result.get(f'accuracy_t{last_t}', math.nan):.3f}  best {best}  "
                 f"({result.get('eval_seconds', math.nan) + result.get('cam_seconds', 0.0):.2f}s){flag}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.log(f"[{self.stage}] trial {trial.trial_id} was lost (its worker or node died); retrying it "
                 f"(failure {trial.num_failures} of at most {MAX_FAILURES})")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log(f"[{self.stage}] trial {trial.trial_id} failed (see {trial.local_path})")
