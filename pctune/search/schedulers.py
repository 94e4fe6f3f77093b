"""Multi-fidelity over images: which trials Ray Tune stops before they have seen every image.

A trial scores the search's images in their fixed (seeded) order and reports its running mean
cross-entropy at the *report points* (images seen = ``grace_images`` x ``reduction_factor``^k, then all
of them), the fidelity being the number of images seen. ``search.scheduler`` chooses who decides:

- ``"fifo"``: nobody; every trial sees every image and reports once (the paper's procedure);
- ``"asha"``: Ray Tune's ASHAScheduler (asynchronous successive halving): at each report point a trial
  goes on only if it is in the best 1/reduction_factor of the trials that reached that point;
- ``"hyperband"``: Ray Tune's HyperBandForBOHB (synchronous brackets; paused trials resume from
  their checkpointed running sums).

What a stopped trial leaves: its partial scores stay in its Tune folder, it is recorded as stopped
early (:class:`pctune.search.callbacks.EarlyStops`), the Optuna study gets it as PRUNED with its
last running mean (:class:`FidelityOptunaSearch`), and it never ranks: only configurations scored on
every image can win (:func:`pctune.search.rundir.rank`).

Ray Tune does not save a scheduler's state with the experiment. On ``--resume``, the ASHA scheduler
rebuilds its rungs from the curves of the trials that finished before (their ``result.json``), so
resumed trials are judged against the same rungs; HyperBand's brackets start over (trials that were
paused or running are rerun from their checkpoints or from the start; finished ones are kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from ray.tune.schedulers import AsyncHyperBandScheduler, HyperBandForBOHB
from ray.tune.search.optuna import OptunaSearch

from pctune.metrics import FIDELITY, METRIC, MODE
from pctune.search.trials import load_trials
from pctune.utils import Log, print_line


@dataclass(frozen=True)
class SchedulerKind:
    """One ``search.scheduler``: what it does to trials, as fields that the job's validator and the
    driver look up (nothing outside this module compares a scheduler's name)."""

    name: str
    description: str
    stops_early: bool  # trials report at rungs and may stop before their last image (ranks one running metric)
    pauses_trials: bool  # pauses trials and resumes them from checkpoints of their running sums

    @property
    def checkpoints(self) -> bool:
        """Trials save their running sums with every report (a paused trial resumes from them)."""
        return self.pauses_trials

    @property
    def limits_concurrency(self) -> bool:
        """Tune's ``max_concurrent_trials`` applies. Paused trials would hold its slots and HyperBand's
        brackets wait for them forever, so there the cluster's resources alone limit concurrency."""
        return not self.pauses_trials


#: scheduler name -> its record; in the order the documentation and errors list them
SCHEDULERS: dict[str, SchedulerKind] = {
    "fifo": SchedulerKind("fifo", "every trial scores every image (the paper's procedure)", False, False),
    "asha": SchedulerKind("asha", "asynchronous successive halving over images seen", True, False),
    "hyperband": SchedulerKind("hyperband", "HyperBand brackets (BOHB); paused trials resume from checkpoints",
                               True, True),
}


def grace_images(total: int, grace: int | None, reduction_factor: float) -> int:
    """The images a trial sees before it can first be stopped: ``grace``, else enough for three rungs
    below the full set (``total / reduction_factor^3``, rounded up)."""
    if grace is None:
        grace = math.ceil(total / reduction_factor ** 3)
    return max(1, min(int(grace), total))


def report_points(total: int, scheduler: str, grace: int | None, reduction_factor: float) -> list[int]:
    """The numbers of images seen at which a trial reports: the rungs ``grace x rf^k`` below ``total``,
    then ``total``; for a scheduler that never stops trials early just ``total``."""
    if not SCHEDULERS[scheduler].stops_early:
        return [total]
    first = grace_images(total, grace, reduction_factor)
    points, rung = [], float(first)
    while rung < total:
        points.append(math.ceil(rung))
        rung *= reduction_factor
    return [*sorted(set(points)), total]


def make_scheduler(scheduler: str, exp_dir: Path, total: int, grace: int | None, reduction_factor: float,
                   metric: str = METRIC, mode: str = MODE):
    """Ray Tune's trial scheduler for ``scheduler`` (None for "fifo": Tune's default), ranking ``metric``."""
    kind = SCHEDULERS[scheduler]
    if not kind.stops_early:
        return None
    first = grace_images(total, grace, reduction_factor)
    cls = FidelityHyperBand if kind.pauses_trials else FidelityASHA
    return cls(exp_dir, total, first, reduction_factor, metric, mode)


class FidelityASHA(AsyncHyperBandScheduler):
    """ASHA over images seen that, on resume, rebuilds its rungs from the finished trials (and says so
    through ``log``, which Tune pickles with the scheduler: a module-level function, as the default)."""

    log: Log = staticmethod(print_line)  # for a scheduler restored from a state pickled before it had a log

    def __init__(self, exp_dir: Path, total: int, grace: int, reduction_factor: float, metric: str = METRIC,
                 mode: str = MODE, log: Log = print_line) -> None:
        super().__init__(time_attr=FIDELITY, metric=metric, mode=mode, max_t=total, grace_period=grace,
                         reduction_factor=reduction_factor, brackets=1)
        self.exp_dir, self.log = str(exp_dir), log
        self.seeded = False

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self.seeded:
            self.seeded = True
            if rebuilt := self.seed_rungs():
                self.log(f"[{Path(self.exp_dir).name}] ASHA rungs rebuilt from the {rebuilt} trials that had "
                         "finished")
        super().on_trial_add(tune_controller, trial)

    def seed_rungs(self) -> int:
        """Record the curves of the trials that finished in an earlier session; returns how many."""
        # each report's value of the metric this scheduler ranks (the objective's), as the trials' curves
        finished = [t for t in load_trials(self.exp_dir, curve_of=self._metric) if t.finished]
        for trial in finished:
            for images_seen, value in trial.curve:
                self._brackets[0].on_result(SimpleNamespace(trial_id=trial.trial_id), images_seen,
                                            self._metric_op * value)
        return len(finished)

    def rung_sizes(self) -> dict[float, int]:
        """images seen at each rung -> how many trials it has recorded."""
        return {milestone: len(recorded) for milestone, recorded in self._brackets[0]._rungs}


class FidelityHyperBand(HyperBandForBOHB):
    """HyperBand over images seen, in units of ``grace`` images (so that its brackets' budgets are the
    report points)."""

    def __init__(self, exp_dir: Path, total: int, grace: int, reduction_factor: float, metric: str = METRIC,
                 mode: str = MODE) -> None:
        super().__init__(time_attr="grace_units", metric=metric, mode=mode, max_t=total / grace,
                         reduction_factor=reduction_factor)
        self.exp_dir, self.grace = str(exp_dir), grace

    def _units(self, result: dict) -> dict:
        return {**result, "grace_units": result[FIDELITY] / self.grace} if FIDELITY in result else result

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return super().on_trial_result(tune_controller, trial, self._units(result))

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, self._units(result))


class FidelityOptunaSearch(OptunaSearch):
    """Ray Tune's OptunaSearch, told of trials stopped early as PRUNED.

    Ray 2.60's OptunaSearch tells Optuna a trial that a scheduler stopped as COMPLETE with its partial
    value, so the sampler would mistake a running mean over a few images for a full score. Here
    intermediate values are reported at step = images seen, and a trial whose last result is not
    final is told as PRUNED (Optuna then keeps its last intermediate value). Optuna's TPE learns from
    pruned trials: it ranks them below every complete trial, the further they got the better, then by
    their last value. HyperBand pauses trials; pausing needs nothing from this searcher.
    """

    #: result keys of a robust objective's constraint values (<= 0: met), set on the Optuna trial before
    #: it is told (``Trial.set_constraint``): TPE, GP and NSGA-II rank infeasible trials below feasible ones
    constraint_keys: tuple[str, ...] = ()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list):  # Optuna takes no intermediate values with several objectives
            return
        if trial_id in self._ot_trials and trial_id not in self._completed_trials and self.metric in result:
            self._ot_trials[trial_id].report(result[self.metric], int(result.get(FIDELITY, 0)))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and self.constraint_keys and trial_id in self._ot_trials and trial_id not in self._completed_trials:
            for key in self.constraint_keys:
                self._ot_trials[trial_id].set_constraint(key, float(result.get(key, 1.0)))
        if (result and not error and not result.get("final", 1.0) and trial_id in self._ot_trials
                and trial_id not in self._completed_trials):
            import optuna

            ot_trial = self._ot_trials[trial_id]
            ot_trial.report(result[self.metric], int(result[FIDELITY]))
            self._ot_study.tell(ot_trial, None, state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)

    def on_pause(self, trial_id: str) -> None:
        """Called by HyperBandForBOHB (through the concurrency limiter); nothing to do for Optuna."""

    def on_unpause(self, trial_id: str) -> None:
        """See :meth:`on_pause`."""
