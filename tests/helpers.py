"""Helpers shared by the test modules (import them with ``from helpers import ...``; test files do not
import each other; the shared fixtures, such as ``cluster`` and ``workdir``, are in conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the search space of the tests' searches on the demo model (three pcoders)
SPACE = """
num_pcoders = 3
[default]
beta = { low = 0.1, high = 0.9 }
lambda = { low = 0.0, high = 0.5 }
alpha = { low = 1e-3, high = 0.5, log = true }
[pcoder2]
beta = { low = 0.3, high = 0.85 }
"""


def demo_files(root: Path, model: str | Path = "demo", space: str = SPACE) -> Path:
    """Random weights for ``model`` (``backbone.pt``, ``feedback.pt``: no training, searches only need a
    network) and the search space ``space`` (``space.toml``) in ``root``; returns ``root``."""
    import torch

    import pctune
    from pctune.models import save_feedback_weights

    torch.manual_seed(0)
    net = pctune.create_model(model)
    torch.save(net.backbone.state_dict(), root / "backbone.pt")
    save_feedback_weights(net, root / "feedback.pt")
    (root / "space.toml").write_text(space)
    return root


def write_job(root: Path, name: str, *, space: str = "space.toml", num_samples: int = 5, concurrent: int = 1,
              images: int = 48, points: str = '["default", { name = "mine", beta = 0.5, lambda = 0.2, alpha = 0.05 }]',
              extra: str = "", sampler: str = "tpe", strategy: str = "joint", timesteps: int = 2,
              search_extra: str = "", objective_extra: str = "") -> Path:
    """A job ``root/<name>.toml`` searching the model of :func:`demo_files` in ``root`` on the digits."""
    path = root / f"{name}.toml"
    path.write_text(f"""
[model]
name = "demo"
backbone_weights = "{root}/backbone.pt"
feedback_weights = "{root}/feedback.pt"
{extra}
[data]
source = "digits"
num_images = {images}
seed = 1
[objective]
sigma = 0.5
timesteps = {timesteps}
batch_size = 64
{objective_extra}
[search]
space = "{space}"
sampler = "{sampler}"
num_samples = {num_samples}
max_concurrent_trials = {concurrent}
seed = 3
strategy = "{strategy}"
starting_points = {points}
{search_extra}
[run]
storage_path = "{root}/runs"
""")
    return path


def fake_run_dir(root: Path, trial_scores: list[float], combination: float | None, diverged: int = -1):
    """A run directory (a :class:`pctune.search.rundir.RunDir`) as a per-pcoder search leaves it, with
    the given scores; trial ``diverged`` diverged (-2: every trial)."""
    from pctune import Hyperparameters
    from pctune.search.rundir import RunDir

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


def demo_job(tmp_path: Path, name: str = "demo", extra: str = "") -> Path:
    """A copy of jobs/demo.toml in ``tmp_path`` (its space given by absolute path), ``extra`` TOML put
    before its tables (top-level keys such as ``name = "..."``)."""
    path = tmp_path / f"{name}job.toml"
    text = (ROOT / "jobs" / "demo.toml").read_text().replace('space = "demo"', f'space = "{ROOT}/search_spaces/demo.toml"')
    path.write_text(extra + "\n" + text if extra else text)
    return path


def image_folder(root: Path, classes: int | list[str], per_class: int = 3, corrupt: int = 0, size: int = 20) -> Path:
    """An ImageNet-style folder of random PNGs: ``classes`` folders (a count: class00, class01, ...; or
    their names), ``per_class`` images each, ``corrupt`` undecodable files in the first."""
    import numpy as np
    from PIL import Image

    names = [f"class{c:02d}" for c in range(classes)] if isinstance(classes, int) else list(classes)
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.random.default_rng(c * 100 + i).integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    for i in range(corrupt):
        (root / names[0] / f"broken{i}.png").write_bytes(b"not a png at all")
    return root


#: a small RGB model spec (the demo CNN's architecture with 3 input channels): train-feedback and folders
TINY_RGB_SPEC = """name = "tiny-rgb"
backbone = "pctune/demo_cnn"
backbone_kwargs = { in_channels = 3, num_classes = 3 }
input_size = [3, 32, 32]
[[pcoders]]
module = "features.1"
[[pcoders]]
module = "features.4"
[[pcoders]]
module = "features.7"
"""


def kill_after_trials(driver: subprocess.Popen, run_dir, trials: int, stage: str = "joint", timeout: float = 240) -> None:
    """SIGKILL the process group of ``driver`` (started with ``start_new_session=True``) once ``trials``
    trials of ``stage`` have finished in ``run_dir`` (a :class:`pctune.search.rundir.RunDir`)."""
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and sum(t.finished for t in run_dir.trials(stage)) < trials:
            assert driver.poll() is None, "the driver ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()


def idle_ray_workers() -> set[int]:
    """Pids of Ray's idle worker processes on this machine (their title is ``ray::IDLE``)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::IDLE"):
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids


def wait_for_idle_workers(timeout: float = 30.0) -> None:
    """Ray prestarts its idle workers in the background after ``ray.init``."""
    deadline = time.monotonic() + timeout
    while not idle_ray_workers() and time.monotonic() < deadline:
        time.sleep(0.2)
