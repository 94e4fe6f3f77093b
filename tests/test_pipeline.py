"""One answer to "which configuration won": the run directory's ranking drives best.toml, the promoted
rank1 and the MLflow @champion alike (per-pcoder combination included)."""

import json
import tomllib
from pathlib import Path

import pytest
import ray
from helpers import demo_files, fake_run_dir

from pctune import Hyperparameters
from pctune.search.job import load_job
from pctune.search.rundir import RunDir


def _write_job(root: Path, uri: str) -> Path:
    demo_files(root)
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


def test_the_ranking_puts_a_better_combination_first_and_never_a_reference_or_diverged_point(tmp_path):
    run_dir = fake_run_dir(tmp_path, [0.5, 0.2, 0.4], combination=0.1, diverged=1)
    ranking = run_dir.ranking()
    assert [e.key for e in ranking] == ["combination", "t2", "t0"]  # t1 diverged, the reference never ranks
    assert ranking[0].hparams.triples()[1][0] == pytest.approx(0.7)
    assert run_dir.best("pcoder1").key == "t2"  # a stage's winner: its own trials only


def test_write_results_writes_the_ranking_winner_to_best_toml(tmp_path):
    from pctune.search.results import leaderboard, write_results

    run_dir = fake_run_dir(tmp_path / "runs" / "fake", [0.5, 0.3], combination=0.2)
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

    fake_run_dir(tmp_path / "runs" / "fake", [10.0], combination=None, diverged=0)
    job_path = tmp_path / "fake.toml"
    job_path.write_text(f'[model]\nname = "demo"\n[data]\nsource = "digits"\n[search]\nspace = "demo"\n'
                        f'[run]\nstorage_path = "{tmp_path}/runs"\n')
    lines = []
    out = write_results(load_job(job_path), log=lines.append)
    assert "best" not in out and not (tmp_path / "runs" / "fake" / "best.toml").exists()
    assert any("every finished trial diverged" in line for line in lines)
