"""Multi-fidelity TPE (after BOHB, Falkner et al. 2018): TPE modelled at one fidelity at a time.

Under ASHA or HyperBand most trials stop at a low rung. Plain Optuna TPE ranks such a PRUNED trial
below every COMPLETE one, so it learns little from it. BOHB instead models the search at one budget,
the largest that enough configurations have reached, and compares them all on it. Here the budget
is the number of images seen: :class:`~pctune.search.schedulers.FidelityOptunaSearch` reports each
trial's running mean at step = images seen. Before each sampling call,
:class:`FidelityTPESampler` hands Optuna's TPE a *view* of the study at one budget ``b``:

- the budgets are the intermediate-value steps of the trials, plus full fidelity (every COMPLETE
  trial, whose final score is often never reported as an intermediate value);
- ``b`` is the largest budget that at least ``min_trials`` trials (finished or running) have reached;
- in the view every trial that reached ``b`` is COMPLETE with its value at step ``b`` (a COMPLETE
  trial with no report at ``b``, one that diverged earlier or its full score, uses its final value),
  so all are compared on the same images; trials that did not reach ``b`` are left out;
- RUNNING trials that have reported nothing yet stay RUNNING (TPE's constant liar); running trials
  that passed a rung below ``b`` are left out (they are already known good or bad).

With no budget reached by ``min_trials`` trials, or in a multi-objective or constrained study, it
samples as plain TPE. Job validation keeps ``tpe-mf`` out of Pareto and constrained searches.
"""

from __future__ import annotations

import math
from typing import Any

from optuna.samplers import TPESampler
from optuna.trial import FrozenTrial, TrialState

FULL = math.inf  # the full-fidelity budget: every COMPLETE trial has reached it
MODELLED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)  # the states a view is made of


class FidelityTPESampler(TPESampler):
    """Optuna's TPESampler that samples from the view of the study at one fidelity (module docstring).

    ``min_trials``: the trials a budget needs before TPE models it; by default
    ``max(ndim + 1, n_startup_trials)``: BOHB's ``d + 1`` points, and never fewer than plain TPE needs
    for its first model (10), so the view's model rests on at least as much data as TPE's own.
    Other keyword arguments go to :class:`optuna.samplers.TPESampler`.
    """

    def __init__(self, *, min_trials: int | None = None, **tpe_kwargs: Any) -> None:
        super().__init__(**tpe_kwargs)
        self._min_trials = min_trials
        self._ndim = 0  # the relative search space's size, known from the first relative sampling
        self.last_budget: float | None = None  # the budget of the last view (None: plain TPE); for tests and logs

    def min_trials(self, ndim: int) -> int:
        return self._min_trials if self._min_trials is not None else max(ndim + 1, self._n_startup_trials)

    def sample_relative(self, study, trial: FrozenTrial, search_space: dict) -> dict[str, Any]:
        self._ndim = max(self._ndim, len(search_space))
        return super().sample_relative(self.view(study), trial, search_space)

    def sample_independent(self, study, trial: FrozenTrial, param_name: str, param_distribution) -> Any:
        return super().sample_independent(self.view(study), trial, param_name, param_distribution)

    def view(self, study):
        """``study`` itself (plain TPE) or :class:`FidelityView` at the largest budget with enough trials."""
        self.last_budget = None
        if study._is_multi_objective():
            return study
        trials = study._get_trials(deepcopy=False, use_cache=False)
        if any(t.constraints for t in trials if t.state.is_finished()):
            return study
        budget = choose_budget(trials, self.min_trials(self._ndim))
        if budget is None:
            return study
        self.last_budget = budget
        return FidelityView(study, budget)


def value_at(trial: FrozenTrial, budget: float) -> float | None:
    """The trial's score at ``budget`` images, None when it has not reached it."""
    if budget in trial.intermediate_values:
        return trial.intermediate_values[budget]
    if trial.state == TrialState.COMPLETE:
        return trial.value
    return None


def choose_budget(trials: list[FrozenTrial], min_trials: int) -> float | None:
    """The largest budget (images seen, or :data:`FULL`) that at least ``min_trials`` of ``trials``
    have reached; None if there is none."""
    trials = [t for t in trials if t.state in MODELLED]
    steps = {step for t in trials for step in t.intermediate_values}
    for budget in sorted(steps | {FULL}, reverse=True):
        if sum(value_at(t, budget) is not None for t in trials) >= min_trials:
            return budget
    return None


class FidelityView:
    """A read-only stand-in for an Optuna study as TPE sees it at one budget: ``_get_trials`` answers
    with the view's trials (module docstring); every other attribute is the study's own (directions,
    storage for the constant liar's shared parameters, ...)."""

    def __init__(self, study, budget: float) -> None:
        self._study = study
        self.budget = budget

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list[FrozenTrial]:
        trials = []
        for t in self._study._get_trials(deepcopy=False, use_cache=use_cache):
            if t.state not in MODELLED:
                continue
            value = value_at(t, self.budget)
            if value is not None:
                t = at_budget(t, value)
            elif t.state != TrialState.RUNNING or t.intermediate_values:
                continue  # stopped below the budget, or running and already past a lower rung
            if states is None or t.state in states:
                trials.append(t)
        return trials

    @property
    def trials(self) -> list[FrozenTrial]:
        return self._get_trials()

    def get_trials(self, deepcopy: bool = True, states=None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)


def at_budget(trial: FrozenTrial, value: float) -> FrozenTrial:
    """A COMPLETE copy of ``trial`` whose value is ``value`` (its parameters and attributes are shared)."""
    return FrozenTrial(number=trial.number, state=TrialState.COMPLETE, value=value,
                       datetime_start=trial.datetime_start, datetime_complete=trial.datetime_complete,
                       params=trial.params, distributions=trial.distributions, user_attrs=trial.user_attrs,
                       system_attrs=trial.system_attrs, intermediate_values=trial.intermediate_values,
                       trial_id=trial._trial_id)
