"""One answer to "which configuration won": the run directory's ranking drives best.toml, the promoted
rank1 and the MLflow @champion alike (per-pcoder combination included)."""

import json
import tomllib
from pathlib import Path

import pytest
import ray
import torch

import pctune
from pctune import Hyperparameters
from pctune.models import save_feedback_weights
from pctune.search.job import load_job
from pctune.search.rundir import RunDir
from tests.test_search import SPACE


def _write_job(root: Path, uri: str) -> Path:
    torch.manual_seed(0)
    net = pctune.create_model("demo")
    torch.save(net.backbone.state_dict(), root / "backbone.pt")
    save_feedback_weights(net, root / "feedback.pt")
    (root / "space.toml").write_text(SPACE)
    path = root / "perpc.toml"
    path.write_text(f"""
[model]
name = "demo"
backbone_weights = "{root}/backbone.pt"
feedback_weights = "{root}/feedback.pt"
[data]
source = "digits"
num_images = 40
[objective]
timesteps = 2
batch_size = 40
[search]
space = "space.toml"
num_samples = 3
strategy = "per-pcoder"
starting_points = ["default"]
[run]
storage_path = "{root}/runs"
[tracking]
tracking_uri = "{uri}"
experiment = "perpc"
[promotion]
top_k = 1
stages = ["noise"]
[promotion.noise]
timesteps = 2
sigmas = [0.5]
num_images = 20
""")
    return path


@pytest.mark.slow
def test_best_toml_promoted_rank1_and_champion_are_the_same_configuration(tmp_path):
    from pctune.pipeline import search
    from pctune.tracking import load_champion

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = load_job(_write_job(tmp_path, uri))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = search(job, log=lambda _m: None)
    finally:
        ray.shutdown()
    best = RunDir(job.run_dir).best()
    assert best is not None and summary["best_key"] == best.key
    with (job.run_dir / "best.toml").open("rb") as fh:
        from_best_toml = Hyperparameters.from_mapping(tomllib.load(fh))
    promoted = Hyperparameters.from_mapping(tomllib.loads((job.run_dir / "promotion" / "rank1" / "hparams.toml")
                                                          .read_text()))
    _net, champion, _t = load_champion("perpc", uri)
    assert from_best_toml == promoted == champion == best.hparams
    assert summary["promotion"]["rank1"]["trial"] == best.key
    # the combination row is ranked with the trials: its score decides, not its kind
    combination = json.loads((job.run_dir / "combination.json").read_text())["metrics"]["mean_ce"]
    assert (best.kind == "combination") == (combination <= min(e.mean_ce for e in RunDir(job.run_dir).ranking()))


def _fake_run_dir(root: Path, trial_scores: list[float], combination: float | None, diverged: int = -1) -> RunDir:
    """A run directory as a per-pcoder search leaves it, with the given scores; trial ``diverged``
    diverged (-2: every trial)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "job.json").write_text(json.dumps({"model": "demo", "job": {"objective": {"timesteps": 2, "sigma": 0.5}}}))
    hp = Hyperparameters([0.5, 0.5, 0.5], [0.1, 0.1, 0.0], [0.01, 0.01, 0.01])
    for i, score in enumerate(trial_scores):
        folder = root / "pcoder1" / f"run_trial_{i:08x}_{i}_pcoder1"
        folder.mkdir(parents=True)
        config = {**hp.to_params(), "pcoder1.beta": 0.1 + 0.1 * i}
        (folder / "params.json").write_text(json.dumps(config))
        metrics = {"mean_ce": score, "diverged": float(i == diverged or diverged == -2), "trial_id": f"t{i}"}
        (folder / "result.json").write_text(json.dumps(metrics) + "\n")
    (root / "references.json").write_text(json.dumps({"feedforward": {"config": hp.to_params(),
                                                                      "metrics": {"mean_ce": 0.01}}}))
    if combination is not None:
        (root / "combination.json").write_text(json.dumps({"config": {**hp.to_params(), "pcoder2.beta": 0.7},
                                                           "metrics": {"mean_ce": combination}}))
    return RunDir(root)


def test_the_ranking_puts_a_better_combination_first_and_never_a_reference_or_diverged_point(tmp_path):
    run_dir = _fake_run_dir(tmp_path, [0.5, 0.2, 0.4], combination=0.1, diverged=1)
    ranking = run_dir.ranking()
    assert [e.key for e in ranking] == ["combination", "t2", "t0"]  # t1 diverged, the reference never ranks
    assert ranking[0].hparams.triples()[1][0] == pytest.approx(0.7)
    assert run_dir.best("pcoder1").key == "t2"  # a stage's winner: its own trials only


def test_write_results_writes_the_ranking_winner_to_best_toml(tmp_path):
    from pctune.search.results import leaderboard, write_results

    run_dir = _fake_run_dir(tmp_path / "runs" / "fake", [0.5, 0.3], combination=0.2)
    job_path = tmp_path / "fake.toml"
    job_path.write_text(f'[model]\nname = "demo"\n[data]\nsource = "digits"\n[search]\nspace = "demo"\n'
                        f'[run]\nstorage_path = "{tmp_path}/runs"\n')
    job = load_job(job_path)
    out = write_results(job, log=lambda _m: None)
    assert out["best_key"] == "combination" and out["best"] == pytest.approx(0.2)
    with (run_dir / "best.toml").open("rb") as fh:
        assert Hyperparameters.from_mapping(tomllib.load(fh)) == run_dir.best().hparams
    frame = leaderboard(job)
    ranked = frame[frame["rank"].notna()]
    assert list(ranked["rank"]) == [1, 2, 3] and ranked.iloc[0]["kind"] == "combination"
    assert frame.iloc[0]["name"] == "feedforward"  # references show where they fall, unranked
    assert frame[frame["kind"] == "reference"]["rank"].isna().all()


def test_every_trial_diverged_gives_no_best_and_no_error(tmp_path):
    from pctune.search.results import write_results

    _fake_run_dir(tmp_path / "runs" / "fake", [10.0], combination=None, diverged=0)
    job_path = tmp_path / "fake.toml"
    job_path.write_text(f'[model]\nname = "demo"\n[data]\nsource = "digits"\n[search]\nspace = "demo"\n'
                        f'[run]\nstorage_path = "{tmp_path}/runs"\n')
    lines = []
    out = write_results(load_job(job_path), log=lines.append)
    assert "best" not in out and not (tmp_path / "runs" / "fake" / "best.toml").exists()
    assert any("every finished trial diverged" in line for line in lines)
