"""A real demo search tracked in a real `mlflow server`: run structure, champion, UI, server failure."""

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow import MlflowClient

from tests.mlflow_server import free_port, mlflow_server

SEARCH_ARGS = ["--num-samples", "6", "--max-concurrent", "1", "--set", "data.num_images=120"]


def _pctune(*args, env, timeout=900):
    result = subprocess.run([sys.executable, "-m", "pctune.cli", *args], capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def env():
    return {**os.environ, "RAY_DEDUP_LOGS": "0"}  # PCTUNE_CACHE: the session's demo model cache (conftest)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, env):
    """One demo search logged to a live server; yields (uri, run storage, stdout)."""
    root = tmp_path_factory.mktemp("tracked")
    with mlflow_server(root) as (uri, _proc):
        out = _pctune("search", "demo", "--tracking-uri", uri, "--storage-path", str(root / "runs"), *SEARCH_ARGS,
                      env=env)
        yield uri, root / "runs", out


def _children(client, experiment_id, parent_id):
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000)


@pytest.mark.slow
def test_search_runs_params_metrics_artifacts_and_champion(tracked, env):
    uri, storage, out = tracked
    assert "@champion" in out
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("pctune-demo")
    parents = client.search_runs([exp.experiment_id], "tags.`pctune.job` = 'demo'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["model"] == "demo" and parent.data.params["sampler"] == "tpe"
    assert {"pctune.version", "pctune.git_commit"} <= set(parent.data.tags)
    for key in ("best_mean_ce", "baseline_mean_ce", "default_mean_ce"):
        assert key in parent.data.metrics
    assert parent.data.metrics["best_mean_ce"] < parent.data.metrics["baseline_mean_ce"]
    children = _children(client, exp.experiment_id, parent.info.run_id)
    assert len(children) == 6
    assert len({c.data.tags["pctune.trial_id"] for c in children}) == 6
    for child in children:
        assert {f"pcoder{n}.{f}" for n in (1, 2, 3) for f in ("beta", "lambda", "alpha")} <= set(child.data.params)
        assert "mean_ce" in child.data.metrics
    history = client.get_metric_history(children[0].info.run_id, "accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(children[0].info.run_id, "recon_error_pc2")) == \
        [0, 1, 2, 3, 4]
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "score_over_trials.png", "accuracy_per_timestep.png"} <= files

    # the champion loads back and reproduces its trial's score
    from pctune.search.job import load_job
    from pctune.search.objective import score
    from pctune.search.prepare import prepare
    from pctune.tracking import load_champion

    net, hparams, timesteps = load_champion("demo", uri)
    job = load_job("demo", {"run.storage_path": str(storage), "data.num_images": 120})
    prep = prepare(job, log=lambda _m: None)
    import torch

    got = score(net, torch.from_numpy(prep.images), torch.from_numpy(prep.labels), hparams, timesteps=timesteps,
                batch_size=500)
    best = parent.data.metrics["best_mean_ce"]
    assert got["mean_ce"] == pytest.approx(best, rel=1e-5)


@pytest.mark.slow
@pytest.mark.browser
def test_mlflow_ui_shows_the_search_in_headless_chromium(tracked, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    uri, _, _ = tracked
    exp = MlflowClient(uri).get_experiment_by_name("pctune-demo")
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--window-size=1400,900",
         "--dump-dom", f"{uri}/#/experiments/{exp.experiment_id}/runs"],
        capture_output=True, text=True, timeout=180).stdout
    assert "search-demo" in dom
    import re

    text = re.sub(r"<[^>]+>", "", dom)
    assert re.findall(r"\d+ matching runs", text) == ["7 matching runs"]  # the parent and its six trials


@pytest.mark.slow
def test_server_killed_mid_search_then_sync_logs_each_trial_once(tmp_path, env):
    port = free_port()
    storage = tmp_path / "runs"
    with mlflow_server(tmp_path / "server", port=port) as (uri, proc):
        search = subprocess.Popen([sys.executable, "-m", "pctune.cli", "search", "demo", "--tracking-uri", uri,
                                   "--storage-path", str(storage), "--num-samples", "6", "--max-concurrent", "1",
                                   "--set", "data.num_images=120"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=env)
        client = MlflowClient(uri)
        deadline = time.time() + 600
        while time.time() < deadline:
            exp = client.get_experiment_by_name("pctune-demo")
            runs = client.search_runs([exp.experiment_id], "tags.`pctune.trial_id` != ''") if exp else []
            if len(runs) >= 2:
                break
            time.sleep(0.5)
        proc.terminate()  # the server goes away mid-search
        proc.wait(timeout=30)
    out, _ = search.communicate(timeout=900)
    assert search.returncode == 0, out[-3000:]
    assert "MLflow logging failed" in out and "pctune sync demo" in out
    with mlflow_server(tmp_path / "server", port=port) as (uri, _proc):
        _pctune("sync", "demo", "--tracking-uri", uri, "--storage-path", str(storage), env=env)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("pctune-demo")
        parent = client.search_runs([exp.experiment_id], "tags.`pctune.job` = 'demo'")[0]
        children = _children(client, exp.experiment_id, parent.info.run_id)
        ids = [c.data.tags["pctune.trial_id"] for c in children]
        assert len(ids) == 6 and len(set(ids)) == 6
        assert all(c.data.tags.get("pctune.complete") == "true" for c in children)
        # (that a second sync adds nothing: test_tracking.test_parent_children_and_idempotent_sync)


def test_unreachable_tracking_server_fails_before_any_trial(tmp_path, env):
    uri = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, "-m", "pctune.cli", "search", "demo", "--tracking-uri", uri,
                             "--storage-path", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"pctune: error: MLflow tracking server {uri} is "
                                                             "unreachable")
    assert not (tmp_path / "demo" / "joint").exists()


@pytest.mark.slow
def test_health_endpoint_used_by_the_check(tracked):
    uri, _, _ = tracked
    with urllib.request.urlopen(uri + "/health", timeout=5) as r:
        assert r.status == 200
