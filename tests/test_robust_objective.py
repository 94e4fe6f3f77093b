"""Robust objectives (several conditions, constraints, Pareto): real scoring and real Ray + Optuna +
MLflow searches on a random-weight demo model (no mocks)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_job
from mlflow import MlflowClient

from pctune.cli import main
from pctune.errors import PctuneError
from pctune.search.conditions import combine, lockstep, pareto_front
from pctune.search.job import load_job
from pctune.search.objective import score_chunks
from pctune.search.prepare import prepare
from pctune.search.results import leaderboard
from pctune.search.rundir import RunDir
from pctune.search.t0cache import TimestepZeroCache

CONDITIONS = """
[[objective.conditions]]
name = "noise"
sigma = 0.5
[[objective.conditions]]
name = "clean"
kind = "clean"
timesteps = 3
weight = 0.0
[[objective.conditions]]
name = "fog"
kind = "corruption"
corruption = "fog"
severity = 2
weight = 0.5
"""


def robust_job(root: Path, name: str, objective: str = "", conditions: str = CONDITIONS, *, images: int = 48,
               num_samples: int = 6, search: str = "", sampler: str = "tpe") -> Path:
    """test_search's job (sigma = 0.5, T = 2) with the robust objective's keys and conditions."""
    return write_job(root, name, num_samples=num_samples, concurrent=2, images=images, points='["default"]',
                     sampler=sampler, objective_extra=f"{objective}\n{conditions}", search_extra=search)


# -- the job's specs ---------------------------------------------------------------------------------
BAD = [
    ("", CONDITIONS.replace('kind = "clean"', 'kind = "blur"'),
     "objective.conditions[2].kind: unknown kind 'blur' (noise, clean, corruption)"),
    ("", CONDITIONS.replace('corruption = "fog"', 'corruption = "smog"'),
     "objective.conditions[3].corruption: unknown corruption 'smog'"),
    ("", CONDITIONS.replace("severity = 2", "severity = 6"), "objective.conditions[3].severity: must be 1..5, got 6"),
    ("", CONDITIONS.replace('name = "clean"', 'name = "noise"'), "objective.conditions[2].name: 'noise' is used twice"),
    ("", CONDITIONS.replace('name = "clean"', 'name = "Clean!"'), "objective.conditions[2].name: 'Clean!'"),
    ("", CONDITIONS.replace("sigma = 0.5", "sigma = -1"), "objective.conditions[1].sigma: must be >= 0"),
    ("", CONDITIONS.replace("timesteps = 3", "timesteps = 0"), "objective.conditions[2].timesteps: must be >= 1"),
    ("", CONDITIONS + "colour = 1\n", "objective.conditions[3]: unknown key 'colour'"),
    ('combine = "constraints"', CONDITIONS, "objective.constraints: combine = 'constraints' needs at least one"),
    ('combine = "mean"', CONDITIONS, "objective.combine: unknown combination 'mean'"),
    ('combine = "pareto"\npareto = ["noise"]', CONDITIONS, "objective.pareto: must name 2 or 3 conditions, got 1"),
    ('combine = "pareto"\npareto = ["noise", "rain"]', CONDITIONS, "objective.pareto: no condition named 'rain'"),
    ('pareto = ["noise", "clean"]', CONDITIONS, "objective.pareto: only with combine = 'pareto'"),
    ('combine = "constraints"', CONDITIONS + '[[objective.constraints]]\ncondition = "rain"\n',
     "objective.constraints[1].condition: no condition named 'rain' (noise, clean, fog)"),
    ('combine = "constraints"', CONDITIONS + '[[objective.constraints]]\ncondition = "clean"\nmetric = "loss"\n',
     "objective.constraints[1].metric: must be one of accuracy, ce, got 'loss'"),
    ("", '[[objective.constraints]]\ncondition = "clean"\n', "objective.constraints: needs objective.conditions"),
]


@pytest.mark.parametrize(("objective", "conditions", "message"), BAD)
def test_bad_condition_and_constraint_specs_are_one_line_errors(workdir, objective, conditions, message):
    path = robust_job(workdir, "bad-robust", objective, conditions)
    with pytest.raises(PctuneError) as caught:
        load_job(path)
    text = str(caught.value)
    assert "\n" not in text and text.startswith(str(path)) and message in text


@pytest.mark.parametrize(("objective", "search", "sampler", "message"), [
    ('combine = "pareto"\npareto = ["noise", "clean"]', 'scheduler = "asha"', "tpe",
     "search.scheduler: combine = 'pareto' needs"),
    ('combine = "pareto"\npareto = ["noise", "clean"]', "", "gp", "search.sampler: combine = 'pareto' needs"),
    ("", 'scheduler = "hyperband"', "tpe", "search.scheduler: 'hyperband' works with a single condition"),
])
def test_a_search_that_cannot_serve_the_objective_is_refused(workdir, objective, search, sampler, message):
    with pytest.raises(PctuneError, match=message):
        load_job(robust_job(workdir, "bad-robust-search", objective, search=search, sampler=sampler))


# -- scoring ---------------------------------------------------------------------------------------
def test_each_condition_scores_as_it_would_alone_and_the_paper_condition_as_today(workdir):
    job = load_job(robust_job(workdir, "conditions", images=40))
    prep = prepare(job, log=lambda _m: None)
    robust = job.objective.robust()
    net, labels = prep.net, torch.from_numpy(prep.labels)
    hp = net.hyperparameters("default")
    alone = {c.name: list(score_chunks(net, torch.from_numpy(prep.conditions[c.name]), labels, hp,
                                       timesteps=c.timesteps, batch_size=16))[-1] for c in robust.conditions}
    cache = TimestepZeroCache()  # one cache for every condition, as on a worker: no condition may see another's
    for _ in range(2):  # cold, then every timestep 0 from the cache
        streams = {c.name: score_chunks(net, torch.from_numpy(prep.conditions[c.name]), labels, hp,
                                        timesteps=c.timesteps, batch_size=16, report_at=(16,),
                                        starts=cache.starts(net, ("k",), 1.0, {"cached": 0}, images=c.name))
                   for c in robust.conditions}
        *_, together = lockstep(robust, streams, penalty=99.0)
        for c in robust.conditions:
            assert together[f"mean_ce_{c.name}"] == alone[c.name]["mean_ce"]
            for t in range(c.timesteps + 1):
                assert together[f"accuracy_{c.name}_t{t}"] == alone[c.name][f"accuracy_t{t}"]
    assert together["mean_ce"] == pytest.approx((alone["noise"]["mean_ce"] + 0.5 * alone["fog"]["mean_ce"]) / 1.5)
    assert together["ce_t1"] == alone["noise"]["ce_t1"]  # the first condition, unsuffixed
    # the paper's job (sigma, no conditions) sees exactly the images of the "noise" condition
    plain = prepare(load_job(robust_job(workdir, "plain", conditions="", images=40)),
                    log=lambda _m: None)
    assert np.array_equal(plain.images, prep.conditions["noise"]) and np.array_equal(plain.labels, prep.labels)
    clean = prep.conditions["clean"]
    assert not np.array_equal(clean, prep.conditions["fog"]) and not np.array_equal(clean, plain.images)


def test_constraint_values_measure_the_worst_timestep_against_timestep_zero():
    robust = load_job_robust('combine = "constraints"', CONDITIONS + """
[[objective.constraints]]
condition = "clean"
metric = "accuracy"
tolerance = 0.005
[[objective.constraints]]
condition = "noise"
metric = "ce"
""")
    def result(acc, ce):
        return {"mean_ce": sum(ce[1:]) / (len(ce) - 1), "diverged": 0.0, "num_images": 10.0, "final": 1.0,
                "eval_seconds": 0.0, **{f"accuracy_t{t}": a for t, a in enumerate(acc)},
                **{f"ce_t{t}": c for t, c in enumerate(ce)}}
    out = combine(robust, {"noise": result([0.5, 0.6, 0.6], [1.0, 0.9, 1.2]),
                           "clean": result([0.9, 0.89, 0.88, 0.9], [0.3, 0.3, 0.3, 0.3]),
                           "fog": result([0.7, 0.7, 0.7], [0.5, 0.5, 0.5])}, penalty=9.0)
    assert out["constraint_clean_accuracy"] == pytest.approx(0.02 - 0.005)  # worst: t = 2, two points down
    assert out["constraint_noise_ce"] == pytest.approx(0.2)  # ce_t2 = 1.2 against ce_t0 = 1.0
    assert out["feasible"] == 0.0


def load_job_robust(objective: str, conditions: str):
    import tomllib

    from pctune.search.conditions import read_robust

    table = tomllib.loads(f"[objective]\n{objective}\n{conditions}")["objective"]
    return read_robust(table["conditions"], table.get("combine", "aggregate"), table.get("constraints", []),
                       table.get("pareto", []), 2, "<test>")


def test_pareto_front_by_hand():
    points = [(1, 5), (2, 2), (5, 1), (3, 3), (2, 2), (1, 6), (math.nan, 0)]
    assert pareto_front(points) == [True, True, True, False, True, False, False]


# -- searches ---------------------------------------------------------------------------------------
# On the random-weight model the clean CE rises by 0.001-0.002 nats over t = 1..3 (accuracy does not
# move): a tolerance in between makes the constraint bind for some trials only
CONSTRAINED = """
[[objective.constraints]]
condition = "clean"
metric = "ce"
tolerance = 0.0015
"""


@pytest.mark.slow
def test_a_constrained_search_never_registers_an_infeasible_champion(cluster, workdir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = robust_job(workdir, "constrained", 'combine = "constraints"', CONDITIONS + CONSTRAINED, num_samples=8)
    assert main(["search", str(path), "--address", cluster, "--tracking-uri", uri]) == 0
    job = load_job(path)
    run_dir = RunDir(job.run_dir)
    trials = run_dir.trials("joint")
    assert len(trials) == 8
    feasible = {t.trial_id: bool(t.metrics["feasible"]) for t in trials}
    assert not all(feasible.values())  # the constraint binds: some trials break it
    frame = leaderboard(job)
    assert frame[frame["rank"].notna()]["feasible"].all()  # infeasible ones are kept, unranked
    assert (~frame[frame.kind == "trial"]["feasible"]).sum() == sum(not f for f in feasible.values())
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name(job.name).experiment_id],
                                filter_string=f"tags.`mlflow.runName` = 'search-{job.name}'")[0]
    tags = parent.data.tags
    assert tags["pctune.champion_rule"].startswith("lowest mean_ce")
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    for child in children:  # every condition's metrics on every trial's run
        trial = next(t for t in trials if t.trial_id == child.data.tags["pctune.trial_id"])
        assert child.data.tags["pctune.feasible"] == ("true" if feasible[trial.trial_id] else "false")
        for name, horizon in (("noise", 2), ("clean", 3), ("fog", 2)):
            assert child.data.metrics[f"mean_ce_{name}"] == pytest.approx(trial.metrics[f"mean_ce_{name}"])
            history = client.get_metric_history(child.info.run_id, f"accuracy_{name}")
            assert sorted(m.step for m in history) == list(range(horizon + 1))
    best = run_dir.best()
    if best is None:  # nothing feasible: nothing registered
        assert "pctune.champion_trial" not in tags
        return
    assert best.feasible and tags["pctune.champion_feasible"] == "True"
    assert tags["pctune.champion_trial"] == best.key
    if best.kind == "trial":
        assert feasible[best.trial_id]
    version = client.get_model_version_by_alias(job.name, "champion")
    assert version.tags["pctune.champion_rule"] == tags["pctune.champion_rule"]


@pytest.mark.slow
def test_a_pareto_search_marks_exactly_the_non_dominated_trials(cluster, workdir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = robust_job(workdir, "pareto", 'combine = "pareto"\npareto = ["noise", "clean"]', num_samples=8)
    assert main(["search", str(path), "--address", cluster, "--tracking-uri", uri]) == 0
    job = load_job(path)
    frame = leaderboard(job)
    ranked = frame[frame["rank"].notna()]
    points = list(zip(ranked["mean_ce_noise"], ranked["mean_ce_clean"], strict=True))
    brute = [not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points) for p in points]
    assert list(ranked["pareto_front"]) == brute and any(brute)
    front = ranked[ranked["pareto_front"]]
    assert list(ranked["rank"][: len(front)]) == list(range(1, len(front) + 1))  # the front ranks first
    assert RunDir(job.run_dir).best().metrics["mean_ce_noise"] == front["mean_ce_noise"].min()  # the job's rule
    assert (Path(job.run_dir) / "summary" / "tradeoff.png").is_file()
