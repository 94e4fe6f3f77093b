"""MLflow tracking against a real `mlflow server` on loopback."""

import pytest
import torch
from mlflow import MlflowClient

import pctune
from pctune import Hyperparameters, PctuneError
from pctune.tracking import SearchTracker, check_reachable, load_champion, register_champion, trial_metrics
from tests.mlflow_server import free_port, mlflow_server

TINY_SPEC = '''name = "tiny-track"
backbone = "pctune/demo_cnn"
backbone_kwargs = { in_channels = 1, num_classes = 4, width = 4 }
input_size = [1, 16, 16]
[[pcoders]]
module = "features.1"
[[pcoders]]
module = "features.4"
[hyperparameters.default]
beta = 0.5
lambda = 0.2
alpha = 0.0
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as (uri, _proc):
        yield uri


def _result(mean_ce, T=2):
    out = {"mean_ce": mean_ce, "diverged": 0}
    for t in range(T + 1):
        out[f"ce_t{t}"] = mean_ce + t * 0.1
        out[f"accuracy_t{t}"] = 0.5 - t * 0.01
        out[f"recon_error_pc1_t{t}"] = 1.0 / (t + 1)
    return out


def test_trial_metrics_are_stepped():
    metrics = trial_metrics({"mean_ce": 1.5, "ce_t0": 2.0, "accuracy_t3": 0.4, "recon_error_pc2_t1": 0.3,
                             "pcoder1.beta": 0.2, "name": "x"})
    assert sorted(metrics) == sorted([("mean_ce", 1.5, 0), ("ce", 2.0, 0), ("accuracy", 0.4, 3),
                                      ("recon_error_pc2", 0.3, 1)])


@pytest.mark.slow
def test_parent_children_and_idempotent_sync(server):
    tracker = SearchTracker(server, "tracking-test", search_id="search-1")
    parent = tracker.start("demo", {"model": "demo", "sampler": "tpe", "seed": 0})
    configs = [{"pcoder1.beta": 0.5, "pcoder1.lambda": 0.1, "pcoder1.alpha": 0.0}, {"pcoder1.beta": 0.7,
               "pcoder1.lambda": 0.2, "pcoder1.alpha": 0.01}]
    tracker.log_trial("t1", configs[0], _result(1.2))
    # a second tracker (a resumed driver, or `pctune sync`) finds the same parent and logs only what is missing
    again = SearchTracker(server, "tracking-test", search_id="search-1")
    assert again.start("demo", {}) == parent
    added = again.log_missing([("t1", configs[0], _result(1.2)), ("t2", configs[1], _result(1.1))])
    assert added == 1
    assert again.log_missing([("t1", configs[0], _result(1.2)), ("t2", configs[1], _result(1.1))]) == 0
    again.log_summary({"best_mean_ce": 1.1, "baseline_mean_ce": 1.3, "default_mean_ce": 1.25},
                      params=configs[1])
    again.finish()

    client = MlflowClient(server)
    exp = client.get_experiment_by_name("tracking-test")
    parent_run = client.get_run(parent)
    assert parent_run.data.tags["pctune.job"] == "demo"
    assert parent_run.data.params["sampler"] == "tpe"
    assert parent_run.data.metrics["best_mean_ce"] == 1.1
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.data.tags["pctune.trial_id"] for r in children) == ["t1", "t2"]
    child = next(r for r in children if r.data.tags["pctune.trial_id"] == "t2")
    assert child.data.params == {"pcoder1.beta": "0.7", "pcoder1.lambda": "0.2", "pcoder1.alpha": "0.01"}
    assert child.data.metrics["mean_ce"] == 1.1
    history = client.get_metric_history(child.info.run_id, "accuracy")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(0, 0.5), (1, 0.49), (2, 0.48)]


def test_unreachable_server_is_one_line():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PctuneError, match=r"^MLflow tracking server http://127.0.0.1:\d+ is unreachable"):
        check_reachable(uri, timeout=2)


@pytest.mark.slow
def test_champion_round_trip(server, tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SPEC)
    torch.manual_seed(0)
    net = pctune.create_model(spec)
    hp = Hyperparameters([0.6, 0.7], [0.2, 0.0], [0.0, 0.0])
    tracker = SearchTracker(server, "champion-test", search_id="search-2")
    run_id = tracker.start("tiny", {})
    version = register_champion(server, run_id, net, hp, model_name="tiny-track", spec_path=spec, timesteps=3,
                                pretrained=False)
    assert MlflowClient(server).get_model_version_by_alias("tiny-track", "champion").version == version
    loaded, loaded_hp, timesteps = load_champion("tiny-track", server)
    assert loaded_hp == hp and timesteps == 3
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(loaded.run(x, 3, loaded_hp), net.run(x, 3, hp))


@pytest.mark.slow
def test_search_summary_logs_scores_csv_and_plots(server, tmp_path):
    import pandas as pd

    from pctune.tracking.summary import log_search_summary

    rows = []
    for i in range(8):
        beta, lam = 0.3 + 0.08 * i, 0.05 * (i % 3)
        result = _result(1.0 + (beta - 0.6) ** 2 + lam)
        rows.append({"trial_id": f"t{i}", "pcoder1.beta": beta, "pcoder1.lambda": lam, **result})
    trials = pd.DataFrame(rows)
    tracker = SearchTracker(server, "summary-test", search_id="search-3")
    run_id = tracker.start("demo", {})
    best = trials.loc[trials.mean_ce.idxmin()].to_dict()
    metrics = log_search_summary(tracker, trials, {"baseline": _result(1.5), "default": _result(1.3)}, tmp_path, best)
    assert metrics == {"best_mean_ce": pytest.approx(1.0 + 0.06 ** 2), "baseline_mean_ce": 1.5,
                       "default_mean_ce": 1.3}
    client = MlflowClient(server)
    run = client.get_run(run_id)
    assert run.data.metrics["baseline_mean_ce"] == 1.5
    assert run.data.tags["best.pcoder1.beta"] == str(trials.loc[trials.mean_ce.idxmin(), "pcoder1.beta"])
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {"leaderboard.csv", "score_over_trials.png", "accuracy_per_timestep.png", "param_importances.png"} <= files


def test_a_reopened_feedback_run_logs_only_the_steps_and_epochs_after_those_it_holds(tmp_path):
    """A driver killed after logging steps past its last checkpoint recomputes them after --resume: the
    reopened run must not hold them twice. (MLflow's SQL store collapses a metric logged again with the
    same value and timestamp, but a recomputed step may differ in the last bits: a GPU's kernels.)"""
    from pctune.tracking.feedback import FeedbackRun

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    record = {"loss": 0.5, "pcoder_losses": [0.2, 0.3]}
    first = FeedbackRun(uri, "tiny-feedback")
    first.start("tiny", {"model": "tiny"})
    first.log_steps([(s, 1.0 / s) for s in range(1, 6)])
    first.log_epoch({**record, "epoch": 1})
    again = FeedbackRun(uri, "tiny-feedback", first.run_id)
    again.start("tiny", {"model": "tiny"})
    again.log_steps([(s, 1.0 / s + 1e-7) for s in range(4, 9)])  # recomputed: equal up to float rounding
    again.log_epoch({**record, "epoch": 1, "loss": 0.5000001})
    again.log_epoch({**record, "epoch": 2})
    client = MlflowClient(uri)
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "train_step_loss")) == list(range(1, 9))
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "train_recon_loss")) == [1, 2]
