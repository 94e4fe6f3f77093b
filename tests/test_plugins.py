"""Variants as plug-ins (issue 24): each vocabulary is compared only by the module that owns it, and a
new objective is one class and one table entry, defined here, that runs a real search end to end."""

from __future__ import annotations

import ast
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pctune"

#: vocabulary -> (its names, the modules that own it, the attribute chains that hold a name of it)
VOCABULARIES = {
    "objective.kind": ({"cross_entropy", "cam_iou"}, ("pctune.search.objectives",), {("objective", "kind")}),
    "search.scheduler": ({"fifo", "asha", "hyperband"}, ("pctune.search.schedulers",), {("search", "scheduler")}),
    "search.strategy": ({"joint", "per-pcoder", "single-pcoder-grid"},
                        ("pctune.search.strategies", "pctune.search.grid"), {("search", "strategy")}),
    "data.source": ({"digits", "imagenet-val"}, ("pctune.data.sources",), {("data", "source")}),
}
#: constants that hold a vocabulary name
NAMED = {"GRID_STRATEGY": "search.strategy", "GRID": "search.strategy"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _vocabularies(operand: ast.AST) -> set[str]:
    """The vocabularies an operand of a comparison names: a string of one, a collection of such strings,
    an attribute chain that holds one, or a constant that does."""
    found = set()
    elements = operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand]
    for element in elements:
        if isinstance(element, ast.Constant) and isinstance(element.value, str):
            found |= {v for v, (names, _, _) in VOCABULARIES.items() if element.value in names}
        if isinstance(element, ast.Name) and element.id in NAMED:
            found.add(NAMED[element.id])
    chain = tuple(ast.unparse(operand).split("."))  # job.search.strategy -> (job, search, strategy)
    found |= {v for v, (_, _, chains) in VOCABULARIES.items() if chain[-2:] in chains}
    return found


def vocabulary_comparisons(modules: dict[str, Path]) -> list[str]:
    """``module:line compares <vocabulary>`` for every comparison outside the vocabulary's owners."""
    offences = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Compare):
                continue
            for vocabulary in set().union(*(_vocabularies(o) for o in [node.left, *node.comparators])):
                owners = VOCABULARIES[vocabulary][1]
                if not any(name == o or name.startswith(o + ".") for o in owners):
                    offences.append(f"{name}:{node.lineno} compares {vocabulary}")
    return offences


def test_vocabularies_are_compared_only_by_their_owners():
    assert vocabulary_comparisons(_modules()) == []


def test_the_vocabulary_check_finds_comparisons(tmp_path):
    """The check can fail: each way of comparing a name is found outside its owner, and not inside it."""
    bad = tmp_path / "pctune" / "search" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text('if job.objective.kind == "x": pass\nif s in ("fifo", "asha"): pass\n'
                   'if job.data.source != d: pass\nif cfg.strategy == GRID_STRATEGY: pass\nok = "joint"\n')
    owner = tmp_path / "pctune" / "search" / "schedulers.py"
    owner.write_text('if name == "fifo": pass\n')
    found = vocabulary_comparisons({"pctune.search.bad": bad, "pctune.search.schedulers": owner})
    assert found == ["pctune.search.bad:1 compares objective.kind", "pctune.search.bad:2 compares search.scheduler",
                     "pctune.search.bad:3 compares data.source", "pctune.search.bad:4 compares search.strategy"]


# -- a new objective, defined here -----------------------------------------------------------------------
from pctune.metrics import at_timestep  # noqa: E402
from pctune.search.objectives import CrossEntropy  # noqa: E402

ACCURACY = "final_accuracy"


@dataclass(frozen=True)
class FinalAccuracy(CrossEntropy):
    """Accuracy at t = T on the paper's noisy images, maximized."""

    kind = ACCURACY
    metric = ACCURACY
    mode = "max"

    @classmethod
    def from_job(cls, job, source):
        return cls(timesteps=job.objective.timesteps, batch_size=job.objective.batch_size)

    def reported(self):
        return (ACCURACY,)

    def describe(self):
        return "accuracy at t = T on the noisy subset; higher is better"

    def scores(self, trial, sums=None):
        for metrics in super().scores(trial, sums):
            metrics[ACCURACY] = metrics[at_timestep("accuracy", self.timesteps)]
            yield metrics


@pytest.mark.slow
def test_an_objective_defined_in_a_test_runs_a_real_search(tmp_path, monkeypatch):
    import ray.cloudpickle
    from helpers import demo_job
    from mlflow import MlflowClient

    from pctune.pipeline import search
    from pctune.search.job import load_job
    from pctune.search.objectives import OBJECTIVES
    from pctune.search.rundir import RunDir

    monkeypatch.setitem(OBJECTIVES, ACCURACY, FinalAccuracy)  # the one table entry
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers get the class by value
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = load_job(demo_job(tmp_path), {"objective.kind": ACCURACY, "search.num_samples": 6, "data.num_images": 120,
                                        "search.max_concurrent_trials": 2, "run.storage_path": str(tmp_path / "runs"),
                                        "tracking.tracking_uri": uri})
    lines: list[str] = []
    try:
        search(job, log=lines.append)
    finally:
        ray.shutdown()
    run_dir = RunDir(job.run_dir)
    assert run_dir.goal() == (ACCURACY, "max")
    trials = [e for e in run_dir.entries() if e.kind == "trial"]
    assert len(trials) == 6 and all(e.score(ACCURACY) == e.metrics["accuracy_t4"] for e in trials)
    best = run_dir.best()
    assert best.score(ACCURACY) == max(e.score(ACCURACY) for e in trials if not e.diverged)
    toml = (run_dir / "best.toml").read_text()
    assert f"# {ACCURACY} = {best.score(ACCURACY):.6g} (accuracy at t = T on the noisy subset; higher is better)" in toml
    leaderboard = (run_dir / "leaderboard.csv").read_text().splitlines()
    assert leaderboard[0].split(",")[:4] == ["rank", "kind", "name", ACCURACY]
    client = MlflowClient(uri)
    parent = client.get_run(client.get_model_version_by_alias(job.name, "champion").run_id)
    tags = client.get_run(parent.info.run_id).data.tags
    assert tags.get("pctune.champion_trial") == best.key, lines[-20:]
    assert math.isclose(parent.data.metrics[f"best_{ACCURACY}"], best.score(ACCURACY))
    child = client.search_runs([parent.info.experiment_id], f"tags.`pctune.trial_id` = '{best.key}'")[0]
    assert math.isclose(child.data.metrics[ACCURACY], best.score(ACCURACY))  # tracking logs its own metric
    assert any(f"maximize {ACCURACY}" in line for line in lines)


# -- the records' behaviour ------------------------------------------------------------------------------
def test_metric_names_are_built_and_classified_in_one_place():
    from pctune.metrics import at_timestep, constraint, is_scalar_metric, is_trial_metric, of_condition, step_metric

    assert step_metric(at_timestep("ce", 3)) == ("ce", 3)
    assert step_metric(at_timestep(of_condition("accuracy", "clean"), 10)) == ("accuracy_clean", 10)
    assert step_metric("recon_error_pc2_t3") == ("recon_error_pc2", 3)
    assert step_metric("cam_iou_t0") is None and step_metric("mean_ce") is None
    for key in (of_condition("mean_ce", "fog"), "diverged_fog", constraint("fog", "accuracy"), "feasible", "cam_iou",
                "cam_iou_t4", "cam_iou_rel"):
        assert is_scalar_metric(key) and is_trial_metric(key), key
    for key in ("time_this_iter_s", "training_iteration", "pid", "trial_id", "date", "my_score"):  # Ray's, unknown
        assert not is_trial_metric(key) and not is_scalar_metric(key), key
    assert is_trial_metric("my_score", extra=("my_score",)) and is_scalar_metric("my_score", extra=("my_score",))


def test_a_resumed_search_replays_every_metric_a_trial_reported():
    """Robust metrics (per condition, constraints, feasible) and an objective's own names are kept;
    Ray Tune's additions are not (they would clash with the replayed report)."""
    from pctune.search.driver import _reported_results
    from pctune.search.trials import Trial

    reported = {"mean_ce": 0.4, "mean_ce_fog": 0.5, "ce_fog_t2": 0.6, "constraint_fog_accuracy": -0.1, "feasible": 1.0,
                "num_images": 48.0, "final": 1.0, "my_score": 0.9}
    trial = Trial("t1", "run_00000", 0, "TERMINATED", {}, {**reported, "time_this_iter_s": 1.0, "trial_id": "t1",
                                                          "training_iteration": 1, "date": "2026-12-06"})
    assert _reported_results([trial], ("my_score",)) == {"t1": reported}


def _cam_job(tmp_path, extra: str = "", kind: str = "cam_iou"):
    """The shipped cam_iou sweep job (its space by absolute path), ``extra`` TOML appended."""
    from pctune.search.job import load_job

    text = (ROOT / "jobs" / "demo-explain-sweep.toml").read_text()
    text = text.replace('space = "demo"', f'space = "{ROOT}/search_spaces/demo.toml"')
    path = tmp_path / "cam.toml"
    path.write_text(text.replace('kind = "cam_iou"', f'kind = "{kind}"') + extra)
    return load_job(path)


def test_objective_cam_settings_come_before_the_explain_stages(tmp_path):
    from dataclasses import asdict

    plain = _cam_job(tmp_path)
    explain = asdict(plain.promotion.settings["explain"])
    # without [objective.cam]: the explain stage's settings, as earlier versions fingerprinted them
    assert plain.kinds.objective.identity(plain) == {"promotion.explain": explain}
    tuned = _cam_job(tmp_path, '\n[objective.cam]\ncam_threshold = 0.3\ngrad_mode = "constant-error"\n')
    cam = tuned.kinds.objective
    assert (cam.cam.threshold, cam.cam.grad_mode) == (0.3, "constant-error")
    assert cam.settings == {**explain, "cam_threshold": 0.3, "grad_mode": "constant-error"}
    assert tuned.promotion.settings["explain"].cam_threshold == explain["cam_threshold"]  # the stage keeps its own


@pytest.mark.parametrize(("kind", "table", "message"), [
    ("cam_iou", "cam_threshold = 2.0", r"cam.toml: objective.cam.cam_threshold: must be in \[0, 1\], got 2.0$"),
    ("cam_iou", 'grad_mode = "none"', r"cam.toml: objective.cam.grad_mode: unknown mode 'none'"),
    ("cam_iou", "thresh = 1", r"cam.toml: objective.cam: unknown key 'thresh'"),
    ("cross_entropy", "cam_threshold = 0.3", r"cam.toml: objective.cam: only with objective.kind = 'cam_iou'"),
])
def test_bad_objective_cam_settings_are_one_line_errors(tmp_path, kind, table, message):
    from pctune.errors import PctuneError

    with pytest.raises(PctuneError, match=message):
        _cam_job(tmp_path, f"\n[objective.cam]\n{table}\n", kind)


def test_a_trial_that_reports_no_mean_ce_is_read_back(tmp_path):
    """The trial contract asks for the fidelity and the objective's own metric, not ``mean_ce``: such a
    trial's reports are read back (finished, its metric there, no mean_ce curve)."""
    import json

    from pctune.search.trials import load_trials

    folder = tmp_path / "joint" / "run_trial_1a2b3c4d_00000_0_2026-12-06"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"pcoder1.beta": 0.3}))
    reports = [{"trial_id": "1a2b3c4d", "num_images": n, "total_images": 120, "my_score": s, "diverged": 0.0,
                "final": float(n == 120)} for n, s in ((40, 0.5), (120, 0.7))]
    (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in reports))
    (trial,) = load_trials(tmp_path / "joint")
    assert (trial.status, trial.metrics["my_score"], trial.curve) == ("TERMINATED", 0.7, ())
