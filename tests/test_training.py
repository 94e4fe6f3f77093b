"""`pctune train-feedback` on a small generated ImageFolder."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import TINY_RGB_SPEC
from PIL import Image


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three classes of smooth random images (blurred noise with a class-dependent colour cast)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in range(3):
        (root / f"class{label}").mkdir()
        for i in range(12):
            base = rng.normal(size=(12, 12, 3))
            base[..., label] += 1.5
            img = np.clip((base - base.min()) / (np.ptp(base) + 1e-9) * 255, 0, 255).astype(np.uint8)
            Image.fromarray(img).resize((40, 40), Image.BILINEAR).save(root / f"class{label}" / f"{i}.png")
    return root


def _train(spec, data, out, epochs, *extra):
    cmd = [sys.executable, "-m", "pctune.cli", "train-feedback", str(spec), "--data", str(data), "--out", str(out),
           "--epochs", str(epochs), "--batch-size", "12", "--workers", "0", "--lr", "3e-3", "--device", "cpu", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_train_feedback_reduces_loss_and_resumes(tmp_path, image_folder):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_RGB_SPEC)
    out = tmp_path / "run"
    first = _train(spec, image_folder, out, 3)
    assert "epoch 3:" in first
    state = torch.load(out / "last.pt", weights_only=True)
    losses = [h["loss"] for h in state["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]

    second = _train(spec, image_folder, out, 5, "--resume")
    assert "resumed from" in second and "after epoch 3" in second
    assert "epoch 1:" not in second and "epoch 4:" in second and "epoch 5:" in second
    resumed = torch.load(out / "last.pt", weights_only=True)["history"]
    assert [h["loss"] for h in resumed[:3]] == losses
    assert resumed[-1]["loss"] < losses[0]

    import pctune

    net = pctune.create_model(spec, feedback_weights=out / "feedback.pt")
    trained = torch.load(out / "feedback.pt", weights_only=True)["decoders"]
    assert torch.equal(net.decoders.state_dict()["0.0.weight"], trained["0.0.weight"])


def test_train_feedback_bad_data_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pctune.cli", "train-feedback", "pvgg16", "--data",
                             str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"pctune: error: {tmp_path / 'missing'}: no such directory"


BAD_SPEC = TINY_RGB_SPEC.replace('module = "features.7"', 'module = "features.99"')


@pytest.mark.parametrize("case", ["more workers than CPUs", "an empty folder", "a layer the backbone lacks"])
def test_train_feedback_bad_input_is_one_line_and_writes_nothing(tmp_path, image_folder, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.toml").write_text(BAD_SPEC)
    (tmp_path / "tiny.toml").write_text(TINY_RGB_SPEC)
    args, message = {
        "more workers than CPUs": ([str(tmp_path / "tiny.toml"), "--data", str(image_folder), "--num-workers", "64"],
                                   "--num-workers 64 needs 64 CPUs but the Ray cluster has "),
        "an empty folder": (["pvgg16", "--data", str(tmp_path / "empty")],
                            f"{tmp_path / 'empty'}: not an image folder"),
        "a layer the backbone lacks": ([str(tmp_path / "bad.toml"), "--data", str(image_folder)],
                                       "the backbone has no module named 'features.99'"),
    }[case]
    result = subprocess.run([sys.executable, "-m", "pctune.cli", "train-feedback", *args, "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("pctune:") or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith(f"pctune: error: {message}"), result.stderr
    assert not (tmp_path / "out").exists(), "a refused training leaves no output folder"
