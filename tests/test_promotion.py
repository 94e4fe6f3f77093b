"""`pctune promote` on a finished demo search: the four stages end to end, files and MLflow.

Each stage runs at its smallest (BIM crafted at t and transferred from t = 0; the 15 corruptions that
make up mCE; a few images); the stages are tested in depth in test_adversarial, test_imagenet_c and
test_explain."""

import os
import subprocess
import sys

import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.mlflow_server import mlflow_server

JOB = '''name = "promo"
[model]
name = "demo"
[data]
source = "digits"
num_images = 120
seed = 0
[objective]
sigma = 0.5
timesteps = 3
batch_size = 120
[search]
space = "demo"
num_samples = 4
max_concurrent_trials = 1
seed = 0
[tracking]
experiment = "promo-test"
[promotion]
top_k = 1
auto = false
stages = ["noise", "adversarial", "imagenet-c", "explain"]
[promotion.noise]
timesteps = 3
sigmas = [0.0, 0.5]
num_images = 60
[promotion.adversarial]
timesteps = 2
num_images = 6
chunk = 6
use_ray = false
resamples = 100
attacks = [{ name = "bim", epsilons = [0.2], steps = 3, modes = ["exact", "transfer"] }]  # hsj: test_adversarial
[promotion.imagenet-c]
source = "generated"
corruptions = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression"]
timesteps = 2
num_images = 6
resamples = 100
use_ray = false
[promotion.explain]
timesteps = 2
sigmas = [0.0, 0.5]
num_images = 8
chunk = 4
resamples = 100
overlays = 2
'''


@pytest.mark.slow
def test_promote_runs_every_stage_and_logs_nested_runs(tmp_path):
    env = dict(os.environ)  # the session's demo model cache (conftest)
    job = tmp_path / "promo.toml"
    job.write_text(JOB.replace('space = "demo"', f'space = "{_space()}"'))
    with mlflow_server(tmp_path / "mlflow") as (uri, _proc):
        for args in (["search", str(job)], ["promote", str(job)]):
            result = subprocess.run([sys.executable, "-m", "pctune.cli", *args, "--storage-path", str(tmp_path / "runs"),
                                     "--tracking-uri", uri], capture_output=True, text=True, timeout=1500, env=env)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        out = result.stdout
        assert "promotion: rank1" in out and "promotion: rank2" not in out
        root = tmp_path / "runs" / "promo" / "promotion"
        for rank in ("rank1",):
            noise = pd.read_csv(root / rank / "noise" / "noise_sweep.csv")
            assert set(noise.sigma) == {0.0, 0.5} and set(noise.timestep) == {0, 1, 2, 3}
            first = noise[noise.timestep == 0]
            # normalized to timestep 0, except where clean and noisy coincide (sigma = 0): no ratio of zeros
            assert (first[first.sigma > 0].corr_dist_pc1_rel_t0 == 1.0).all()
            assert noise[noise.sigma == 0].corr_dist_pc1_rel_t0.isna().all()
            success = pd.read_csv(root / rank / "adversarial" / "success.csv")
            assert set(success.attack) == {"bim"} and set(success["mode"]) == {"exact", "transfer"}
            mce = pd.read_csv(root / rank / "imagenet-c" / "mce.csv")
            assert list(mce.timestep) == [0, 1, 2] and mce.mce.notna().all() and mce.relative_mce.notna().all()
            cam = pd.read_csv(root / rank / "explain" / "iou.csv")
            assert sorted(set(zip(cam.sigma, cam.timestep, strict=True))) == [(s, t) for s in (0.0, 0.5) for t in range(3)]
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("promo-test")
        runs = client.search_runs([exp.experiment_id], "tags.`pctune.promotion` != ''")
        assert sorted(r.data.tags["pctune.promotion"] for r in runs) == ["rank1"]
        run = runs[0]
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "mce")) == [0, 1, 2]
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "cam_iou_sigma0.5")) == [0, 1, 2]
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"mce.csv", "success.csv", "noise_sweep.csv", "mce_over_timesteps.png", "success.png",
                "accuracy_per_sigma.png", "ce_last_vs_t0.png", "iou.csv", "iou_over_timesteps.png",
                "overlays_sigma0.png", "overlays_sigma0.5.png"} <= files


def _space():
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1] / "search_spaces" / "demo.toml")


def test_promote_without_a_search_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pctune.cli", "promote", "demo", "--storage-path", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("pctune: error: no search of demo in")


@pytest.mark.parametrize("bad,message", [('stages = ["mnist-c"]', "unknown stage 'mnist-c'")])
def test_bad_promotion_settings_are_one_line(tmp_path, bad, message):
    job = tmp_path / "bad.toml"
    job.write_text(JOB.replace('stages = ["noise", "adversarial", "imagenet-c", "explain"]', bad))
    result = subprocess.run([sys.executable, "-m", "pctune.cli", "promote", str(job), "--storage-path", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
