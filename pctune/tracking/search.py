"""A search, tracked: the Ray Tune callback that logs every finished trial as it finishes.

Ray Tune's experiment folders stay the source of truth: a tracking server that goes away mid-search
costs no result. Trials it missed are logged by ``pctune sync JOB`` (or the next ``--resume``),
exactly once each: every child run carries its trial id, and a child is counted only once its last
write (the ``pctune.complete`` tag) went through; an incomplete one is deleted and logged again.

Like Ray's own ``MLflowLoggerCallback``, this takes plain values (here: a function that opens the
search's tracker), never a job or a run directory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray import tune

from pctune.tracking.runs import SearchTracker
from pctune.utils import Log, first_line


class MlflowTrialLogger(tune.Callback):
    """Logs each finished trial as a nested run under the search's parent run. A failure to log is a
    warning, not an error: the result stays in the Tune experiment for ``pctune sync``.

    ``open_tracker`` is called once, when Tune starts the experiment (after the run directory is in
    place); ``warn`` gets the one-line warning of the first failure."""

    def __init__(self, open_tracker: Callable[[], SearchTracker], warn: Log) -> None:
        self.open_tracker = open_tracker
        self.warn = warn
        self.tracker: SearchTracker | None = None
        self.failed = False
        self.curves: dict[str, dict[int, float]] = {}  # trial id -> images seen -> running mean_ce

    def setup(self, **info: Any) -> None:
        try:
            self.tracker = self.open_tracker()
        except Exception as exc:  # MLflow raises its own and requests' exception types
            self.fail(exc)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        if "mean_ce" in result and "num_images" in result:
            self.curves.setdefault(trial.trial_id, {})[int(result["num_images"])] = float(result["mean_ce"])

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        curve = sorted(self.curves.pop(trial.trial_id, {}).items())
        if self.tracker is None or not trial.last_result:
            return
        try:
            self.tracker.log_trial(trial.trial_id, trial.config, trial.last_result, name=f"trial-{trial.trial_id}",
                                   curve=curve)
        except Exception as exc:
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """Stop logging (each attempt would wait on a dead server; ``sync`` catches up); warn once."""
        self.tracker = None
        if not self.failed:
            self.failed = True
            self.warn(first_line(exc)[:200])
