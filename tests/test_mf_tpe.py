"""The multi-fidelity TPE sampler (pctune.search.mf_tpe) on synthetic Optuna studies: no Ray, no model."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from pctune.errors import PctuneError
from pctune.search.mf_tpe import FULL, FidelityTPESampler, FidelityView, choose_budget

SPACE = {"x": FloatDistribution(0.0, 1.0), "y": FloatDistribution(0.0, 1.0)}
RUNGS = (19, 57, 171)


def score(x: float, y: float) -> float:
    return (x - 0.3) ** 2 + (y - 0.6) ** 2


def curve(f: float, rungs) -> dict[int, float]:
    """Running means that drift down to the full score ``f`` (the rungs' values differ from it)."""
    return {step: f + 0.1 / (k + 1) for k, step in enumerate(rungs)}


def add(study, i: int, state: TrialState, rungs=(), full: bool = False, value: float | None = None) -> None:
    x, y = (i * 0.37) % 1.0, (i * 0.61) % 1.0
    f = score(x, y)
    study.add_trial(create_trial(params={"x": x, "y": y}, distributions=SPACE, state=state,
                                 value=(value if value is not None else f) if state == TrialState.COMPLETE else None,
                                 intermediate_values=curve(f, rungs)))


def asha_like(sampler=None):
    """4 trials run to the end, 6 stopped at 57 images, 8 at 19, 2 running past rung 19, 1 just started."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler or FidelityTPESampler(seed=0, multivariate=True))
    n = 0
    for state, rungs, count in ((TrialState.COMPLETE, RUNGS, 4), (TrialState.PRUNED, RUNGS[:2], 6),
                                (TrialState.PRUNED, RUNGS[:1], 8), (TrialState.RUNNING, RUNGS[:1], 2),
                                (TrialState.RUNNING, (), 1)):
        for _ in range(count):
            add(study, n, state, rungs)
            n += 1
    return study


def test_the_view_holds_the_trials_that_reached_the_budget_with_their_value_there():
    study = asha_like()
    add(study, 21, TrialState.COMPLETE, rungs=(), value=9.0)  # diverged at once: final, never reported a rung
    trials = study.get_trials(deepcopy=False)
    # reached: full 5 (the COMPLETE ones), 171: 5, 57: 11, 19: 21 (2 of them running)
    assert choose_budget(trials, 5) == FULL
    assert choose_budget(trials, 6) == 57
    assert choose_budget(trials, 12) == 19
    assert choose_budget(trials, 22) is None

    view = FidelityView(study, 57)
    seen = view._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    assert [t.number for t in seen] == [*range(10), 20, 21]
    assert [t.state for t in seen] == [TrialState.COMPLETE] * 10 + [TrialState.RUNNING, TrialState.COMPLETE]
    # 10-17 stopped at 19 images and 18-19 running past rung 19 are left out; 20 has reported nothing: the liar
    for t in seen[:10]:
        assert t.value == study.trials[t.number].intermediate_values[57]
        assert t.params == study.trials[t.number].params
    assert seen[11].value == 9.0  # a COMPLETE trial without a report at the budget keeps its final value
    assert not view._get_trials(states=(TrialState.PRUNED,))
    # at 19 the running trials that reached it are COMPLETE at their rung-19 value
    at19 = {t.number: t for t in FidelityView(study, 19)._get_trials(states=(TrialState.COMPLETE,))}
    assert sorted(at19) == [*range(20), 21]
    assert at19[18].value == study.trials[18].intermediate_values[19]
    # at full fidelity: the COMPLETE trials' own values; the study itself is untouched
    assert [(t.number, t.value) for t in FidelityView(study, FULL)._get_trials()][:4] == \
        [(t.number, t.value) for t in study.trials[:4]]
    assert [t.state for t in study.trials].count(TrialState.PRUNED) == 14


def test_it_samples_what_plain_tpe_samples_on_the_view():
    """The sampler's proposal is TPE's on a study that holds exactly the view's trials."""
    study = asha_like(FidelityTPESampler(seed=3, multivariate=True, constant_liar=True, min_trials=10))
    new = study.ask(SPACE)
    assert study.sampler.last_budget == 57  # 10 trials reached 57 images, 4 reached 171

    plain = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=3, multivariate=True, constant_liar=True))
    for t in FidelityView(study, 57)._get_trials():
        if t.number != new.number:
            plain.add_trial(create_trial(params=t.params, distributions=SPACE, state=t.state, value=t.value))
    assert plain.ask(SPACE).params == new.params
    # and not what plain TPE proposes on the study itself (stopped trials ranked below finished ones)
    raw = asha_like(optuna.samplers.TPESampler(seed=3, multivariate=True, constant_liar=True))
    assert raw.ask(SPACE).params != new.params


def test_it_falls_back_to_plain_tpe_with_too_few_trials_or_several_objectives():
    sampler = FidelityTPESampler(seed=0, multivariate=True)
    assert sampler.min_trials(2) == 10 and sampler.min_trials(9) == 10 and sampler.min_trials(12) == 13
    study = optuna.create_study(sampler=sampler)
    for i in range(9):
        add(study, i, TrialState.COMPLETE, RUNGS)
    assert sampler.view(study) is study and sampler.last_budget is None
    add(study, 9, TrialState.PRUNED, RUNGS[:1])
    assert isinstance(sampler.view(study), FidelityView) and sampler.last_budget == 19
    add(study, 10, TrialState.COMPLETE, RUNGS)
    assert sampler.view(study).budget == FULL

    pareto = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    for i in range(12):
        pareto.add_trial(create_trial(params={"x": i / 12, "y": 0.5}, distributions=SPACE, values=[i, -i]))
    assert sampler.view(pareto) is pareto


def test_it_is_seeded():
    points = []
    for _ in range(2):
        study = asha_like(FidelityTPESampler(seed=7, multivariate=True, constant_liar=True))
        points.append([study.ask(SPACE).params for _ in range(3)])
    assert points[0] == points[1]
    other = asha_like(FidelityTPESampler(seed=8, multivariate=True, constant_liar=True))
    assert other.ask(SPACE).params != points[0][0]


def test_jobs_with_constraints_refuse_it():
    from pctune.search.job import load_job

    with pytest.raises(PctuneError, match=r"^.*demo-robust.toml: search.sampler: constraints need one of tpe, gp, nsga2$"):
        load_job("demo-robust", {"search.sampler": "tpe-mf"})
    assert load_job("demo", {"search.sampler": "tpe-mf", "search.scheduler": "asha"}).search.sampler == "tpe-mf"
