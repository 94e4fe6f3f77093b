"""Feedback weights passed by their MLflow name (issue 25): a job's ``model.feedback_weights`` may be
``models:/<name>@<alias>``, ``models:/<name>/<version>`` or ``runs:/<run_id>/<path>``. The search's parent
run records the URI and what it resolved to, the run directory keeps that version however the alias
moves later, and a name MLflow does not hold is one line before any trial. Real MLflow (SQLite), real
Ray, the demo's cached weights registered the way train-feedback registers them."""

import json

import pytest
import torch
from helpers import demo_job
from mlflow import MlflowClient

from pctune.cli import main
from pctune.data.demo import ensure_demo_model
from pctune.tracking import load_champion
from pctune.tracking.feedback import FeedbackRun

SMALL = ["--num-samples", "3", "--max-concurrent", "1", "--set", "data.num_images=60"]
HISTORY = [{"epoch": 1, "loss": 0.3, "pcoder_losses": [0.1, 0.1, 0.1]}]


def _register(uri: str, weights) -> tuple[str, str]:
    """(version, run id): ``weights`` registered as a new version of demo-feedback."""
    run = FeedbackRun(uri, "demo-feedback")
    run.start("demo", {"model": "demo"})
    return run.finish(weights, HISTORY, "demo"), run.run_id


def _job(tmp_path, feedback: str):
    backbone = ensure_demo_model(log=lambda _m: None)["backbone"]
    path = demo_job(tmp_path)
    text = path.read_text().replace(
        'name = "demo"          # no weights given: pctune trains and caches the demo model itself',
        f'name = "demo"\nbackbone_weights = "{backbone}"\nfeedback_weights = "{feedback}"')
    assert feedback in text
    path.write_text(text)
    return path


def _parent(uri: str, experiment: str = "pctune-demo"):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)


@pytest.mark.slow
def test_a_search_takes_feedback_weights_by_model_name_and_keeps_the_version_it_resolved(tmp_path, monkeypatch,
                                                                                          capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cached = ensure_demo_model(log=lambda _m: None)["feedback"]
    version, run_id = _register(uri, cached)
    assert version == "1"
    job, storage = _job(tmp_path, "models:/demo-feedback@latest"), tmp_path / "runs"

    assert main(["search", str(job), "--storage-path", str(storage), *SMALL]) == 0
    out = capsys.readouterr().out
    assert f"feedback weights: models:/demo-feedback@latest -> version 1 of demo-feedback (run {run_id})" in out
    params = _parent(uri).data.params
    assert params["feedback_weights"] == "models:/demo-feedback@latest"
    assert params["feedback_weights_resolved"] == "models:/demo-feedback/1"
    assert params["feedback_weights_version"] == "1" and params["feedback_weights_run_id"] == run_id
    record = json.loads((storage / "demojob" / "job.json").read_text())
    assert record["feedback_weights_lineage"]["pinned"] == "models:/demo-feedback/1"
    assert record["fingerprint"]["fields"]["model.feedback_weights"].startswith("models:/demo-feedback/1 (")

    # the champion holds the very decoders that were registered
    net, _hparams, _t = load_champion("demojob", uri)
    registered = torch.load(cached, weights_only=True)["decoders"]
    assert all(torch.equal(net.decoders.state_dict()[k], v) for k, v in registered.items())

    # @latest moves to other weights: the resumed search keeps version 1, and says so
    other = tmp_path / "other.pt"
    state = torch.load(cached, weights_only=True)
    state["decoders"] = {k: v + 0.5 if v.is_floating_point() else v for k, v in state["decoders"].items()}
    torch.save(state, other)
    assert _register(uri, other)[0] == "2"
    assert main(["search", str(job), "--storage-path", str(storage), "--resume", *SMALL[2:],
                 "--num-samples", "4"]) == 0
    out = capsys.readouterr().out
    assert ("note: models:/demo-feedback@latest names models:/demo-feedback/2 now; this run directory keeps "
            "models:/demo-feedback/1") in out, out
    assert json.loads((storage / "demojob" / "job.json").read_text())["feedback_weights_lineage"]["version"] == "1"

    # a pinned version and a run's artifact path name weights too
    for name, source in (("pinned", "models:/demo-feedback/2"), ("byrun", f"runs:/{run_id}/feedback/feedback.pt")):
        (tmp_path / name).mkdir()
        job = _job(tmp_path / name, source)
        assert main(["search", str(job), "--storage-path", str(tmp_path / f"runs-{name}"), *SMALL]) == 0
        assert f"feedback weights: {source} -> " in capsys.readouterr().out


@pytest.mark.parametrize("source, named", [
    ("models:/nope@latest", "models:/nope@latest: not found in the MLflow tracking store"),
    ("models:/demo-feedback/7", "models:/demo-feedback/7: not found in the MLflow tracking store"),
    ("runs:/0123456789abcdef0123456789abcdef/feedback.pt", "runs:/0123456789abcdef0123456789abcdef/feedback.pt: "
                                                           "not found"),
    ("models:/", "models:/: not a weights URI"),
])
def test_a_weights_name_mlflow_does_not_hold_is_one_line_before_any_trial(tmp_path, monkeypatch, capsys, source, named):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _register(uri, ensure_demo_model(log=lambda _m: None)["feedback"])
    job, storage = _job(tmp_path, source), tmp_path / "runs"
    for command in (["search", str(job), "--storage-path", str(storage)], ["check", str(job)]):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("pctune: error: ") and named in err, err
    assert not (storage / "demojob").exists()


def test_weights_are_fetched_from_the_given_store_whatever_the_process_wide_mlflow_uri(tmp_path):
    """MLflow's own ``models:/`` download asks the process-wide registry for the version; an earlier
    ``mlflow.set_tracking_uri`` to a server that is gone must not break a fetch from another store."""
    import mlflow

    from pctune.tracking.weights import fetch_weights, resolve_weights_uri

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    weights = tmp_path / "feedback.pt"
    torch.save({"pcoder1": torch.ones(2)}, weights)
    _register(uri, weights)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri("http://127.0.0.1:9")  # nothing listens on the discard port
    try:
        resolved = resolve_weights_uri("models:/demo-feedback@latest", uri)
        fetched = fetch_weights(resolved, uri, tmp_path / "cache")
    finally:
        mlflow.set_tracking_uri(before)
    assert resolved.pinned == "models:/demo-feedback/1"
    assert torch.equal(torch.load(fetched)["pcoder1"], torch.ones(2))
