"""Issue 23, cases 3, 8, 10 and 11: labels by wnid everywhere, masks of the wrong size, and inputs that
gave a traceback (or were silently accepted) now give one line (exit 2) or the documented behaviour."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, demo_job, image_folder
from PIL import Image

from pctune.cli import main
from pctune.errors import PctuneError

WNIDS = ["n02102040", "n02979186", "n03000684"]  # ImageNet-1k outputs 217, 482, 491
INDICES = [217, 482, 491]


@pytest.fixture
def cli(capsys):
    """``pctune ARGS`` in this process: (exit code, stderr lines). An exception escaping ``main`` (a
    traceback for the user) fails the test; the SIGTERM handler the command installs is put back."""
    before = signal.getsignal(signal.SIGTERM)

    def run(*args: str) -> tuple[int, list[str]]:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        finally:
            signal.signal(signal.SIGTERM, before)
        return code, capsys.readouterr().err.splitlines()

    return run


def one_line(result: tuple[int, list[str]], *needles: str) -> str:
    code, lines = result
    assert code == 2 and len(lines) == 1 and lines[0].startswith("pctune: error: "), result
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def pctune_process(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m pctune.cli ARGS`` in its own process, importing the pctune this test imports (the
    environment's PYTHONPATH; ``-P``: not whatever ``pctune/`` the current directory holds)."""
    return subprocess.run([sys.executable, "-P", "-m", "pctune.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def subprocess_one_line(*args: str, timeout: int = 300) -> str:
    """``pctune ARGS`` in its own process: exit 2, one stderr line, no traceback."""
    proc = pctune_process(*args, timeout=timeout)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# -- case 3: labels by wnid ------------------------------------------------------------------------------
def test_the_zoo_declares_imagenet_1k_in_timms_order():
    """Case 3: pvgg16/presnet18/peffnetb0 declare the ImageNet-1k wnids, read from timm (217 = n02102040)."""
    from pctune.data.classes import imagenet_1k
    from pctune.models import get_spec

    assert len(imagenet_1k()) == 1000 and [imagenet_1k()[i] for i in INDICES] == WNIDS
    for name in ("pvgg16", "presnet18", "peffnetb0"):
        assert get_spec(name).classes == "imagenet-1k"
    assert get_spec("demo").classes is None


def test_every_loader_labels_wnid_folders_by_their_imagenet_index(tmp_path):
    """Case 3: the one mapping gives 217/482/491 (a subset keeps its true indices) in the search's subset,
    the promotion stages' clean images and ImageNet-C plans, and train-feedback's folder."""
    from pctune.data.classes import ModelClasses, imagenet_1k
    from pctune.data.folders import image_folder as folder_dataset
    from pctune.data.subsets import load_val_subset
    from pctune.evaluate import imagenet_c as ic
    from pctune.evaluate.images import clean_images
    from pctune.models import get_spec
    from pctune.search.job import load_job
    from pctune.search.prepare import noisy_images

    data = image_folder(tmp_path / "val", WNIDS, per_class=1)
    vgg = ModelClasses(imagenet_1k(), 1000, "pvgg16")
    _, labels = load_val_subset(data, None, 0, image_size=16, classes=vgg)
    assert sorted(labels.tolist()) == INDICES
    images = clean_images("imagenet-val", str(data), (3, 16, 16), None, 0, 0, vgg)
    assert sorted(images.labels.tolist()) == INDICES
    assert sorted(folder_dataset(data, "train", 16, classes=vgg).targets) == INDICES
    plan = ic.plan_generated(data, ["fog"], [1], 1000, model_classes=vgg)
    assert sorted(label for _, label in plan.images["clean"]) == INDICES
    released = tmp_path / "released" / "fog" / "1"
    image_folder(released, WNIDS[1:], per_class=1)  # a subset of the classes
    plan = ic.plan_released(tmp_path / "released", ["fog"], [1], None, 1000, model_classes=vgg)
    assert sorted(label for _, label in plan.images["fog_s1"]) == INDICES[1:]
    subset = image_folder(tmp_path / "subset", WNIDS[1:], per_class=2)
    job = load_job(ROOT / "jobs" / "pvgg16.toml", {"data.path": str(subset), "data.num_images": 4})
    _, labels = noisy_images(job, get_spec("pvgg16"))
    assert sorted(labels.tolist()) == [482, 482, 491, 491]


@pytest.fixture(scope="module")
def pvgg16():
    from pctune.models import create_model

    return create_model("pvgg16")


def test_the_search_accepts_a_wnid_subset_and_names_an_unknown_folder(tmp_path, pvgg16):
    """Case 3: the search's class check takes a subset of the model's wnids (it refused any count but
    1000) and names a class folder that is not one of them, in one line."""
    from pctune.search.job import load_job
    from pctune.search.prepare import check_classes

    subset = image_folder(tmp_path / "subset", WNIDS[1:], per_class=1)
    job = load_job(ROOT / "jobs" / "pvgg16.toml", {"data.path": str(subset), "data.num_images": 2})
    assert check_classes(job, pvgg16) == 1000
    bad = image_folder(tmp_path / "bad", [WNIDS[0], "cats"], per_class=1)
    job = load_job(ROOT / "jobs" / "pvgg16.toml", {"data.path": str(bad), "data.num_images": 2})
    with pytest.raises(PctuneError, match=r"data\.path: .*bad: class folder 'cats' is not one of the 1000 classes"):
        check_classes(job, pvgg16)


def test_evaluate_names_an_unknown_class_folder_in_one_line(tmp_path, cli):
    """Case 3: `pctune evaluate noise --model pvgg16` on a folder with a non-wnid class folder is one line
    naming the folder and the class (it ran with labels 0, 1)."""
    data = image_folder(tmp_path / "val", [WNIDS[0], "cats"], per_class=1)
    one_line(cli("evaluate", "noise", "--model", "pvgg16", "--hparams", "default", "--data", data,
                 "--out", tmp_path / "out", "--set", "timesteps=1", "--set", "sigmas=[0.0]"),
             f"{data}: class folder 'cats' is not one of the 1000 classes pvgg16 predicts")


@pytest.mark.slow
def test_evaluate_pvgg16_scores_wnid_folders_against_their_imagenet_labels(tmp_path):
    """Case 3, end to end: a pvgg16 whose classifier always answers 482 (n02979186) scores 1/3 on one image
    of each of n02102040, n02979186, n03000684 (labelled 217, 482, 491); labelled 0, 1, 2 it scored 0."""
    from torchvision.models import vgg16

    state = vgg16().state_dict()
    state["classifier.6.weight"].zero_()
    state["classifier.6.bias"].zero_()
    state["classifier.6.bias"][482] = 10.0
    weights = tmp_path / "vgg16-482.pt"
    torch.save(state, weights)
    del state
    data = image_folder(tmp_path / "val", WNIDS, per_class=1)
    proc = pctune_process("evaluate", "noise", "--model", "pvgg16", "--hparams", "default", "--data", data,
                          "--out", tmp_path / "out", "--backbone-weights", weights, "--set", "timesteps=1",
                          "--set", "sigmas=[0.0]")
    weights.unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pandas as pd

    table = pd.read_csv(tmp_path / "out" / "noise_sweep.csv")
    assert table.accuracy.tolist() == pytest.approx([1 / 3] * len(table)), table


# -- case 8: masks of the wrong size -------------------------------------------------------------------
def _digit_masks(folder: Path, size: tuple[int, int] | None) -> Path:
    """An ImageNet-S style mask (class 1 everywhere) for every held-out digit image, ``size`` (width,
    height) or the image's own."""
    from pctune.data.demo import digits_folder

    for image in digits_folder(16).rglob("*.png"):
        width, height = size or Image.open(image).size
        rgb = np.zeros((height, width, 3), dtype=np.uint8)
        rgb[..., 0] = 1
        (folder / image.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / image.parent.name / image.name)
    return folder


def _explain(cli, tmp_path: Path, masks: Path, *extra: str):
    return cli("evaluate", "explain", "--model", "demo", "--hparams", "default", "--data", "digits",
               "--out", tmp_path / f"out-{masks.name}", "--set", f"masks={masks}", "--set", "num_images=6",
               "--set", "timesteps=1", "--set", "sigmas=[0.0]", "--set", "use_ray=false", "--set", "resamples=10",
               "--set", "overlays=0", *extra)


def test_a_mask_of_another_size_than_its_image_is_one_line(tmp_path, cli):
    """Case 8: 3x40 and 200x7 masks of 16x16 digits are one line naming the mask file (they were resized
    and an IoU reported); masks of the images' own size are scored."""
    for size in ((3, 40), (200, 7)):
        masks = _digit_masks(tmp_path / f"masks{size[0]}x{size[1]}", size)
        line = one_line(_explain(cli, tmp_path, masks), f"the mask is {size[0]}x{size[1]} but its image",
                        "is 16x16", "mask_resize = true")
        assert str(masks) in line and ".png" in line
    code, err = _explain(cli, tmp_path, _digit_masks(tmp_path / "right", None))
    assert code == 0, err
    assert (tmp_path / "out-right" / "iou.csv").is_file()


def test_mask_resize_is_an_explicit_setting(tmp_path, cli):
    """Case 8: `mask_resize = true` (off by default) resizes the masks to their images, in `pctune evaluate`
    and in a job's [promotion.explain] (where the cam_iou objective reads its settings too)."""
    from pctune.evaluate.settings import ExplainSettings
    from pctune.search.job import load_job

    assert ExplainSettings().mask_resize is False
    code, err = _explain(cli, tmp_path, _digit_masks(tmp_path / "wrong", (3, 40)), "--set", "mask_resize=true")
    assert code == 0, err
    assert (tmp_path / "out-wrong" / "iou.csv").is_file()
    job = load_job(demo_job(tmp_path), {"promotion.explain.mask_resize": True})
    assert job.promotion.settings["explain"].mask_resize is True


# -- case 10: tracebacks --------------------------------------------------------------------------------
def test_hyperparameters_that_are_not_tables_are_one_line(tmp_path, cli):
    """Case 10: `hyperparameters = "evil"` in a pctune model spec (an AttributeError)."""
    spec = tmp_path / "evil.toml"
    spec.write_text('name = "tiny"\nbackbone = "pctune/demo_cnn"\ninput_size = [1, 16, 16]\nhyperparameters = "evil"\n'
                    '[[pcoders]]\nmodule = "features.1"\n')
    one_line(cli("evaluate", "noise", "--model", spec, "--hparams", "default", "--data", "digits", "--out",
                 tmp_path / "out"), f"{spec}: hyperparameters must be tables of presets", "got a str")


def test_a_300_character_job_name_is_one_line(tmp_path, cli):
    """Case 10: a job name too long for a folder name (an OSError when the run folder was made)."""
    job = demo_job(tmp_path, extra=f'name = "{"x" * 300}"')
    one_line(cli("results", job, "--storage-path", tmp_path / "runs"), "name: too long: 300 characters (at most 100")


def test_seeds_out_of_numpys_range_are_refused_when_the_job_is_read(tmp_path, cli):
    """Case 10: `--seed -5` failed with a ValueError after the references were scored; every seed of a job
    and of the stage settings is checked when the job is read."""
    job = demo_job(tmp_path)
    for key, value in (("search.seed", -5), ("data.seed", -1), ("objective.noise_seed", 2**32),
                       ("promotion.noise.seed", -2)):
        one_line(cli("results", job, "--storage-path", tmp_path / "runs", "--set", f"{key}={value}"),
                 f"{key}: must be in 0..4294967295, got {value}")
    line = subprocess_one_line("search", job, "--seed", "-5", "--storage-path", tmp_path / "runs")
    assert "search.seed: must be in 0..4294967295, got -5" in line
    assert not (tmp_path / "runs" / job.stem / "references.json").exists()


def test_promote_with_an_unknown_stage_is_one_line(tmp_path, cli):
    """Case 10: `pctune promote --stages bogus` (a KeyError)."""
    one_line(cli("promote", demo_job(tmp_path), "--stages", "noise,bogus", "--storage-path", tmp_path / "runs"),
             "--stages: unknown stage 'bogus' (known: imagenet-c, adversarial, noise, explain)")


@pytest.mark.parametrize("flag, value", [("--lr", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--epochs", "0"),
                                         ("--batch-size", "0"), ("--workers", "-1"), ("--image-size", "0")])
def test_train_feedback_numbers_are_checked_before_training(tmp_path, cli, flag, value):
    """Case 10 (`--lr -1`, a traceback) and case 11 (`--epochs 0` wrote untrained weights and exited 0)."""
    data = image_folder(tmp_path / "train", 2, per_class=1, size=16)
    one_line(cli("train-feedback", "demo", "--data", data, "--out", tmp_path / "out", "--workers", "0", flag, value),
             f"{flag} must be ")
    assert not (tmp_path / "out" / "feedback.pt").exists()


def test_train_feedback_resume_onto_a_directory_fails_before_training(tmp_path):
    """Case 10: `train-feedback --resume` where OUT/last.pt is a directory failed after training."""
    data = image_folder(tmp_path / "train", WNIDS, per_class=2, size=32)
    (tmp_path / "out" / "last.pt").mkdir(parents=True)
    line = subprocess_one_line("train-feedback", "presnet18", "--data", data, "--out", tmp_path / "out", "--epochs",
                               "1", "--batch-size", "6", "--workers", "0", "--image-size", "32", "--resume")
    assert f"{tmp_path / 'out' / 'last.pt'} is not a file" in line and "training" not in line
    assert not (tmp_path / "out" / "feedback.pt").exists()


@pytest.mark.parametrize("name, text", [("job.json", '{"job": '), ("references.json", "not json"),
                                        ("references.json", "[1, 2]")])
def test_a_damaged_run_file_is_one_line_saying_how_to_recover(tmp_path, cli, name, text):
    """Case 10: a corrupt job.json or references.json, then `pctune results` (a JSONDecodeError)."""
    job = demo_job(tmp_path)
    run = tmp_path / "runs" / job.stem
    run.mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({"job": {"objective": {"timesteps": 2}}, "metric": "mean_ce"}))
    (run / name).write_text(text)
    one_line(cli("results", job, "--storage-path", tmp_path / "runs"), f"{run / name}: damaged (",
             "restore it from a backup, or run the search again with --overwrite")


# -- case 11 --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("objective.sigma", "nan"), ("objective.sigma", "inf"),
                                        ("objective.divergence_penalty", "-inf"), ("search.resources.cpu", "inf"),
                                        ("promotion.noise.sigmas", "[0.5, nan]"),
                                        ("promotion.explain.cam_threshold", "nan")])
def test_non_finite_numbers_are_refused(tmp_path, cli, key, value):
    """Case 11: `objective.sigma = nan` was accepted (every trial diverged); every float of a job must be
    finite, from the file or from `--set`."""
    line = one_line(cli("results", demo_job(tmp_path), "--storage-path", tmp_path / "runs", "--set",
                        f"{key}={value}"), f": {key}")
    assert "expected a finite number, got" in line or "must be a finite number, got" in line, line


def test_non_finite_numbers_in_a_job_file_and_stage_settings(tmp_path, cli):
    """Case 11: `sigma = nan` written in the job file, and `pctune evaluate --set sigmas=[inf]`."""
    job = demo_job(tmp_path)
    job.write_text(job.read_text().replace("sigma = 0.5", "sigma = nan", 1))
    assert "sigma = nan" in job.read_text()
    one_line(cli("results", job, "--storage-path", tmp_path / "runs"), "objective.sigma: expected a finite number")
    one_line(cli("evaluate", "noise", "--model", "demo", "--hparams", "default", "--data", "digits", "--out",
                 tmp_path / "out", "--set", "sigmas=[inf]"), "sigmas[1]: expected a finite number, got inf")


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_names_the_decoders_reason(tmp_path, workers):
    """Case 11: with `data.unreadable = "fail"` the error said "(unreadable)" when the images were decoded
    in worker processes; the decoder's reason travels with the image."""
    from pctune.data.subsets import load_val_subset

    data = image_folder(tmp_path / "val", 2, per_class=1, corrupt=1)
    with pytest.raises(PctuneError) as caught:
        load_val_subset(data, None, 0, image_size=16, workers=workers)
    message = str(caught.value)
    assert "broken0.png: cannot be read as an image (" in message and "(unreadable)" not in message, message
    assert "cannot identify image file" in message, message
    skipped: list[str] = []
    _, labels = load_val_subset(data, None, 0, image_size=16, workers=workers, unreadable=skipped)
    assert len(labels) == 2 and [Path(p).name for p in skipped] == ["broken0.png"]


def test_an_unknown_top_level_key_of_a_predify_config_is_refused(tmp_path, cli):
    """Case 11: an unknown top-level key of a Predify configuration was ignored."""
    config = tmp_path / "predify.toml"
    config.write_text('name = "p"\nbackbone = "pctune/demo_cnn"\ninput_size = [1, 16, 16]\ngradient_scalling = true\n'
                      '[[pcoders]]\nmodule = "features [1]"\n'
                      'predictor = "ConvTranspose2d(16, 1, kernel_size=3, stride=1, padding=1)"\n')
    one_line(cli("evaluate", "noise", "--model", config, "--hparams", "default", "--data", "digits", "--out",
                 tmp_path / "out", "--set", "timesteps=1", "--set", "num_images=4", "--set", "sigmas=[0.0]"),
             f"{config}: unknown key 'gradient_scalling' in a Predify configuration")


def test_train_feedback_of_a_grey_model_on_an_rgb_folder_is_one_line(tmp_path, capsys):
    """No traceback for any input: the demo model takes 1-channel digits, a folder is read as RGB (this
    was a channel-mismatch traceback from inside the training loop)."""
    from pctune.cli import main

    data = image_folder(tmp_path / "train", classes=10, per_class=1)
    assert main(["train-feedback", "demo", "--data", str(data), "--epochs", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "demo takes 1-channel images" in err, err
    assert not (tmp_path / "o").exists()
