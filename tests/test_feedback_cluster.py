"""`pctune train-feedback --num-workers N` on Ray Train (issue 25): real Ray, 2 CPU workers, gloo, real
MLflow (SQLite).

- Two workers take the same steps as one: the same global batches in the same order, each worker's
  loss weighted by its share (pctune.feedback.plan), so DDP's averaged gradient is the one-process
  gradient. Only the order of float32 additions differs (the all-reduce sums two partial gradients; a
  convolution's reduction runs over half the batch): over 28 Adam steps the decoder weights agree to a
  relative 1e-5 of each tensor's largest entry (measured: 4e-7 after 14), and every step's loss to 1e-5.
- A worker SIGKILLed mid-epoch: Ray Train replaces it, the workers continue from the last checkpoint,
  the training finishes with every step logged once (no gap, no step before the checkpoint again) and
  the same weights as a run that was not disturbed. The driver SIGKILLed with its local Ray: the same
  command with ``--resume`` does the same, in the same MLflow run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY_RGB_SPEC, image_folder
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

ARGS = ["--batch-size", "8", "--workers", "0", "--lr", "3e-3", "--device", "cpu", "--val-fraction", "0.1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("feedback")
    (root / "tiny.toml").write_text(TINY_RGB_SPEC)
    image_folder(root / "images", 3, per_class=40, size=40)  # 120 images: 108 to train, 12 held out
    return root


def _command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pctune.cli", "train-feedback", str(data / "tiny.toml"), "--data",
            str(data / "images"), "--out", str(out), *ARGS, *extra]


def _run(data: Path, out: Path, uri: str, *extra: str) -> str:
    done = subprocess.run(_command(data, out, *extra), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _decoders(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "feedback.pt", weights_only=True)["decoders"]


def _worst(a: dict, b: dict) -> float:
    """The largest difference of two state dicts, relative to each tensor's largest entry."""
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)


def _step_losses(uri: str, out: Path) -> list[tuple[int, float]]:
    run_id = json.loads((out / "mlflow-run.json").read_text())["run_id"]
    history = MlflowClient(uri).get_metric_history(run_id, "train_step_loss")
    return sorted((m.step, m.value) for m in history)


def test_two_workers_take_the_same_steps_as_one(data, steady):
    """The undisturbed 2-worker run (the fault tests' reference) against the same command in one process."""
    uri, one = _uri(steady), steady.parent / "one"
    assert "2 worker(s), global batch 8" in _stdout(steady) and "Ray: 2 CPUs" in _stdout(steady)
    _run(data, one, uri, *ONE_WORKER)
    assert _worst(_decoders(one), _decoders(steady)) < 1e-5
    steps_one, steps_two = _step_losses(uri, one), _step_losses(uri, steady)
    assert [s for s, _ in steps_one] == [s for s, _ in steps_two] == list(range(1, 29))
    assert all(abs(a - b) <= 1e-5 * abs(a) for (_, a), (_, b) in zip(steps_one, steps_two, strict=True))
    client = MlflowClient(uri)
    versions = sorted(int(v.version) for v in client.search_model_versions("name='tiny-rgb-feedback'"))
    assert versions == [1, 2] and str(client.get_model_version_by_alias("tiny-rgb-feedback", "latest").version) == "2"
    run = client.get_run(client.get_model_version("tiny-rgb-feedback", "1").run_id)
    assert run.data.params["workers"] == "2" and run.data.params["global_batch"] == "8"
    assert {"train_recon_loss_pc1", "val_recon_loss_pc3", "images_per_s"} <= set(run.data.metrics)
    assert not list(steady.glob("ray-train-*")), "Ray Train's copies of the checkpoints are removed at the end"


def _train_workers() -> list[int]:
    return [int(line.split()[0]) for line in subprocess.run(["ps", "-eo", "pid,args"], capture_output=True,
                                                            text=True).stdout.splitlines()
            if line.split(None, 1)[-1].startswith("ray::RayTrainWorker")]


FAULT_RUN = ["--epochs", "2", "--num-workers", "2", "--checkpoint-every", "3"]
ONE_WORKER = ["--epochs", "2", "--checkpoint-every", "3"]


@pytest.fixture(scope="module")
def steady(data, tmp_path_factory) -> Path:
    """A 2-worker run nothing disturbs (MLflow in the folder above it): what one worker must match and
    what a run with a fault must reproduce."""
    root = tmp_path_factory.mktemp("steady")
    (root / "stdout.txt").write_text(_run(data, root / "out", f"sqlite:///{root}/mlflow.db", *FAULT_RUN))
    return root / "out"


def _uri(steady: Path) -> str:
    return f"sqlite:///{steady.parent}/mlflow.db"


def _stdout(steady: Path) -> str:
    return (steady.parent / "stdout.txt").read_text()


def _until_checkpoint(driver: subprocess.Popen, out: Path, log: Path) -> None:
    """Wait for the first checkpoint inside epoch 1 (``--checkpoint-every 3``) and live train workers."""
    deadline = time.time() + 300
    while not (out / "last.pt").is_file() or not _train_workers():
        assert driver.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.2)


def _assert_reproduces(steady: Path, out: Path, uri: str) -> None:
    """Every step logged once in MLflow (no gap, none run again) and the undisturbed run's weights and
    history: the same order, the same crops, the same sums carried over the fault."""
    assert [s for s, _ in _step_losses(uri, out)] == list(range(1, 29)), "every step logged once"
    history = torch.load(out / "feedback.pt", weights_only=True)["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert _worst(_decoders(steady), _decoders(out)) < 1e-5
    steady_history = torch.load(steady / "feedback.pt", weights_only=True)["history"]
    for a, b in zip(steady_history, history, strict=True):
        assert a["images"] == b["images"] and abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"]


def test_a_worker_killed_mid_epoch_is_replaced_and_training_continues_from_the_last_checkpoint(data, steady,
                                                                                                 tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    killed = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    driver = subprocess.Popen(_command(data, killed, *FAULT_RUN), stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri}, start_new_session=True)
    try:
        _until_checkpoint(driver, killed, tmp_path / "killed.log")
        victim = _train_workers()[-1]
        os.kill(victim, signal.SIGKILL)
        assert driver.wait(timeout=400) == 0, (tmp_path / "killed.log").read_text()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
    out = (tmp_path / "killed.log").read_text()
    assert "Ray Train restarted the workers after a failure: training continues from the checkpoint at epoch" in out
    _assert_reproduces(steady, killed, uri)


def test_a_driver_killed_mid_epoch_resumes_on_ray_train_from_its_checkpoint_in_the_same_mlflow_run(data, steady,
                                                                                                    tmp_path):
    """The driver and its local Ray SIGKILLed (the node lost) after a checkpoint inside epoch 1; the same
    command with --resume continues from OUT/last.pt in the same MLflow run. Steps the dead driver had
    logged past that checkpoint are recomputed but not logged twice."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out, log_path = tmp_path / "out", tmp_path / "driver.log"
    with log_path.open("w") as log:
        driver = subprocess.Popen(_command(data, out, *FAULT_RUN), stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "MLFLOW_TRACKING_URI": uri}, start_new_session=True)
        try:
            _until_checkpoint(driver, out, log_path)
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    run_id = (out / "mlflow-run.json").read_text()
    assert not (out / "feedback.pt").exists()
    resumed = _run(data, out, uri, *FAULT_RUN, "--resume")
    assert "resumed from" in resumed and "at epoch 1 step" in resumed, resumed
    assert (out / "mlflow-run.json").read_text() == run_id
    assert MlflowClient(uri).get_run(json.loads(run_id)["run_id"]).info.status == "FINISHED"
    _assert_reproduces(steady, out, uri)


BYO_SPEC = """name = "pmobile"
description = "MobileNetV3-small (torchvision, not in the zoo) + 3 pcoders"
backbone = "torchvision/mobilenet_v3_small"
backbone_kwargs = { num_classes = 3 }
input_size = [3, 32, 32]
[[pcoders]]
module = "features.0"
[[pcoders]]
module = "features.1"
[[pcoders]]
module = "features.3"
"""


def test_bring_your_own_cnn_end_to_end_with_the_weights_passed_by_name(data, tmp_path):
    """A backbone outside the zoo: its spec, feedback trained on 2 workers and registered, a search that
    names the weights by their MLflow name, the champion in MLflow, a promotion stage."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    (tmp_path / "pmobile.toml").write_text(BYO_SPEC)
    images = data / "images"
    job = tmp_path / "byo.toml"
    job.write_text(f"""
[model]
name = "{tmp_path}/pmobile.toml"
feedback_weights = "models:/pmobile-feedback@latest"
[data]
source = "imagenet-val"
path = "{images}"
num_images = 30
[objective]
timesteps = 2
batch_size = 10
[search]
space = "{ROOT}/search_spaces/demo.toml"
num_samples = 3
max_concurrent_trials = 1
starting_points = []
[run]
storage_path = "{tmp_path}/runs"
[promotion]
top_k = 1
auto = false
stages = ["noise"]
[promotion.noise]
timesteps = 2
sigmas = [0.0, 0.5]
num_images = 12
""")
    commands = [
        ["train-feedback", str(tmp_path / "pmobile.toml"), "--data", str(images), "--out", str(tmp_path / "fb"),
         "--epochs", "1", "--batch-size", "8", "--workers", "0", "--num-workers", "2"],
        ["search", str(job)],
        ["promote", str(job)],
    ]
    outputs = []
    for command in commands:
        done = subprocess.run([sys.executable, "-m", "pctune.cli", *command], capture_output=True, text=True,
                              timeout=600, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        outputs.append(done.stdout)
    assert "registered as models:/pmobile-feedback/1" in outputs[0]
    assert "feedback weights: models:/pmobile-feedback@latest -> version 1 of pmobile-feedback" in outputs[1]
    assert "registered model 'byo' version 1 as @champion" in outputs[1]
    assert "promotion: rank1 noise" in outputs[2]
    from pctune.tracking import load_champion

    net, _hparams, _t = load_champion("byo", uri)
    trained = torch.load(tmp_path / "fb" / "feedback.pt", weights_only=True)["decoders"]
    assert net.name == "pmobile" and all(torch.equal(net.decoders.state_dict()[k], v) for k, v in trained.items())
