"""A run directory has an identity (issue 23, case 1) and knows whether its search ran to its end
(case 9): a resumed search continues the same job only (more trials extend it), and `pctune sync` of a
search that was killed says so and registers no champion unless asked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, demo_job, kill_after_trials

from pctune.cli import main
from pctune.search.rundir import RunDir

SMALL = ["--max-concurrent", "1", "--set", "data.num_images=60"]


@pytest.fixture(autouse=True)
def _tracking_in_tmp(tmp_path, monkeypatch):
    """A local store per test (a server another test started may be gone by now)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _search(job: Path, storage: Path, *args: str) -> int:
    return main(["search", str(job), "--storage-path", str(storage), *SMALL, *args])


@pytest.mark.slow
def test_resume_of_a_changed_job_is_refused_and_changes_nothing(tmp_path, capsys):
    """Case 1: --resume with another sigma, space, seed (or fewer trials) is one line naming the field,
    old and new value; nothing in the run directory is written."""
    job, storage = demo_job(tmp_path), tmp_path / "runs"
    assert _search(job, storage, "--num-samples", "2") == 0
    run = storage / "demojob"
    before = _files(run)
    space = tmp_path / "other-space.toml"
    space.write_text((ROOT / "search_spaces" / "demo.toml").read_text().replace("high = 1.0", "high = 0.8"))
    changes = [(["--set", "objective.sigma=0.9"], "objective.sigma 0.5 -> 0.9"),
               (["--space", str(space)], "search.space "),
               (["--seed", "3"], "search.seed 0 -> 3"),
               (["--num-samples", "1"], "--num-samples 1 is smaller than the 2 this search was run with")]
    for flags, named in changes:
        capsys.readouterr()
        args = ["--num-samples", "2", *flags] if "--num-samples" not in flags else flags
        assert _search(job, storage, "--resume", *args) == 2, flags
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("pctune: error: ") and named in err, err
        assert str(run) in err
        if flags[0] != "--num-samples":
            assert "--overwrite" in err and "--storage-path" in err, err
        assert _files(run) == before, f"{flags} changed the run directory"
    assert json.loads(before["job.json"])["fingerprint"]["fields"]["objective.sigma"] == 0.5


@pytest.mark.slow
def test_resume_with_more_samples_extends_the_same_search(tmp_path, capsys):
    """Case 1: --resume --num-samples 5 after 3 runs exactly 2 more trials, proposed by the restored
    Optuna study, ranked with the first 3, none run again."""
    from pctune.search.schedulers import FidelityOptunaSearch

    job, storage = demo_job(tmp_path), tmp_path / "runs"
    assert _search(job, storage, "--num-samples", "3") == 0
    run = RunDir(storage / "demojob")
    first = {t.trial_id: (run / "joint" / t.folder / "result.json").read_bytes() for t in run.trials("joint")}
    assert len(first) == 3
    capsys.readouterr()
    assert _search(job, storage, "--num-samples", "5", "--resume") == 0, capsys.readouterr()
    trials = run.trials("joint")
    ids = [t.trial_id for t in trials]
    assert len(trials) == 5 and len(set(ids)) == 5 and all(t.finished for t in trials)
    for trial_id, result in first.items():  # kept as they were: never run again
        folder = next(t.folder for t in trials if t.trial_id == trial_id)
        assert (run / "joint" / folder / "result.json").read_bytes() == result
    board = (run / "leaderboard.csv").read_text().splitlines()
    assert sum(",trial," in row for row in board) == 5
    assert {e.trial_id for e in run.entries() if e.kind == "trial"} == set(ids)
    searcher = FidelityOptunaSearch()  # one study: the first 3 trials and the 2 it proposed after them
    searcher.restore_from_dir(str(run / "joint"))
    assert len(searcher._ot_study.get_trials(deepcopy=False)) == 5
    assert run.search_complete() and run.read_json("job.json")["job"]["search"]["num_samples"] == 5


def _killed_search(tmp_path: Path, uri: str) -> RunDir:
    """A demo search SIGKILLed (driver and its local Ray) after 3 finished trials of 40."""
    storage = tmp_path / "runs"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "pctune.cli", "search", "demo", "--storage-path", str(storage),
                               "--num-samples", "40", "--max-concurrent", "1", "--set", "data.num_images=200"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run = RunDir(storage / "demo")
    kill_after_trials(driver, run, 3)
    return run


@pytest.mark.slow
def test_sync_of_a_killed_search_says_incomplete_and_registers_no_champion(tmp_path, capsys):
    """Case 9: `pctune sync` after SIGKILL: the parent run is KILLED and tagged
    pctune.search_complete=false, the log line says how many trials finished, no @champion; with
    --register-incomplete, the best so far is registered."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = _killed_search(tmp_path, uri)
    ended = sum(t.finished for t in run.trials("joint"))
    assert 3 <= ended < 40
    capsys.readouterr()
    assert main(["sync", "demo", "--storage-path", str(run.path.parent)]) == 0
    out = capsys.readouterr().out
    assert f"is incomplete ({ended} of 40 trials finished)" in out and "--register-incomplete" in out, out
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("pctune-demo")
    parent = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1
    assert parent[0].info.status == "KILLED" and parent[0].data.tags["pctune.search_complete"] == "false"
    assert not client.search_model_versions("name='demo'")
    assert main(["sync", "demo", "--storage-path", str(run.path.parent), "--register-incomplete"]) == 0
    out = capsys.readouterr().out
    assert "registered model 'demo' version 1 as @champion" in out, out
    assert str(client.get_model_version_by_alias("demo", "champion").version) == "1"
    assert client.get_run(parent[0].info.run_id).info.status == "KILLED"
    assert not run.search_complete() and run.search_progress() == (ended, 40)


def test_an_older_run_directory_is_compared_by_its_recorded_job():
    """Case 1, run directories of pctune before the fingerprint: their job.json's `job` is compared
    field by field (the digests cannot be)."""
    from dataclasses import asdict

    from pctune.search.identity import config_fields, recorded_fields
    from pctune.search.job import load_job

    old = recorded_fields({"job": asdict(load_job("demo")), "space_description": "default: beta=[0, 1]"})
    new = config_fields(asdict(load_job("demo", {"objective.sigma": 0.9, "search.num_samples": 7,
                                                 "search.max_concurrent_trials": 3, "run.storage_path": "/x"})))
    assert {k for k in old.keys() & new.keys() if old[k] != new[k]} == {"objective.sigma"}
    assert "search.space_description" in old and "data.digest" not in old


def _trial(stage: Path, index: int, final: bool) -> None:
    folder = stage / f"run_trial_{index:08x}_{index}_x"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text("{}")
    (folder / "result.json").write_text(json.dumps({"mean_ce": 0.5, "trial_id": f"t{index}", "final": float(final)}))


def test_a_run_directory_knows_whether_its_search_finished(tmp_path):
    """Case 9: the driver's recorded state decides; without one (an older pctune), the finished trials
    against the recorded num_samples."""
    run = RunDir(tmp_path)
    (tmp_path / "job.json").write_text(json.dumps({"strategy": "joint", "job": {"search": {"num_samples": 3}}}))
    for i in range(2):
        _trial(tmp_path / "joint", i, final=True)
    _trial(tmp_path / "joint", 2, final=False)  # still running when the driver was killed
    assert run.search_progress() == (2, 3) and not run.search_complete()
    (tmp_path / "joint" / "run_trial_00000002_2_x" / "result.json").write_text(json.dumps({"mean_ce": 0.4}))
    assert run.search_progress() == (3, 3) and run.search_complete()
    run.record_search_state("running", 5)  # resumed to extend it, then killed
    assert run.search_progress() == (3, 5) and not run.search_complete()
    run.record_search_state("finished", 5)
    assert run.search_complete()
