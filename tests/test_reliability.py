"""Nothing of the user's is deleted or executed, and every stop is clean (issue 13): each test here
failed on the code before its fix."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import demo_job, fake_run_dir, image_folder

from pctune.cli import main
from pctune.errors import PctuneError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _tracking_in_tmp(tmp_path, monkeypatch):
    """A local store per test: a server another test started (and MLflow put into the environment)
    may be gone by now."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")


def test_overwrite_never_removes_a_folder_that_pctune_did_not_create(tmp_path, capsys):
    storage = tmp_path / "x"
    (storage / "demo").mkdir(parents=True)
    (storage / "demo" / "notes.md").write_text("keep")
    assert main(["search", "demo", "--storage-path", str(storage), "--num-samples", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a pctune run directory" in err and str(storage / "demo") in err
    assert (storage / "demo" / "notes.md").read_text() == "keep"


@pytest.mark.parametrize("name", ["../victim", "", ".", ".."])
def test_a_job_name_cannot_reach_outside_the_storage_path(tmp_path, capsys, name):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("keep")
    other = tmp_path / "runs" / "other"
    other.mkdir(parents=True)
    (other / "job.json").write_text("{}")
    job = demo_job(tmp_path, extra=f'name = "{name}"')
    assert main(["search", str(job), "--storage-path", str(tmp_path / "runs"), "--num-samples", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "name" in err
    assert (victim / "data.txt").read_text() == "keep" and (other / "job.json").is_file()


def test_a_storage_path_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["search", "demo", "--storage-path", str(tmp_path / "afile"), "--num-samples", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a file" in err


def test_overwrite_replaces_only_a_marked_run_and_says_what_it_removed(tmp_path):
    from pctune.search.claim import claim_run_dir
    from pctune.search.job import load_job
    from pctune.search.manifest import MARKER
    from pctune.search.rundir import RunDir

    job = load_job("demo", {"run.storage_path": str(tmp_path)})
    run_dir = RunDir(job.run_dir)
    run_dir.mark()
    run_dir.write_json("job.json", {})  # registered in the manifest, as every writer of a run directory is
    run_dir.register("joint").mkdir()
    lines = []
    claim_run_dir(job, run_dir, lines.append)
    assert "removed: job.json, joint" in lines[-1]
    assert (run_dir / MARKER).is_file() and not (run_dir / "joint").exists()


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_resume_never_unpickles_a_file_from_the_run_directory(tmp_path):
    from pctune.search.tune_state import repair

    exp_dir = tmp_path / "joint"
    exp_dir.mkdir()
    (exp_dir / "experiment_state-2026-01-01_00-00-00.json").write_text('{"cut short')
    marker = tmp_path / "executed"
    payload = pickle.dumps({"session": "2026-01-01_00-00-00", "files": _Hostile(marker)})
    (tmp_path / ".joint.tune-state.pkl").write_bytes(payload)  # the file an older pctune unpickled
    (tmp_path / ".joint.tune-state.json").write_bytes(payload)  # and garbage where the snapshot now lives
    with pytest.raises(PctuneError, match="not a Tune state snapshot pctune wrote"):  # unverifiable: refused
        repair(exp_dir, lambda _m: None)
    assert not marker.exists()


def test_only_weights_only_loads_in_pctune():
    import re

    loads = []
    for path in (ROOT / "pctune").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"pickle\.loads?\(|torch\.load\(", line):
                loads.append((path.name, n, line.strip()))
    assert loads, "expected the weight loaders"
    assert all("torch.load(" in line and "weights_only=True" in line for _f, _n, line in loads), loads


def test_ctrl_c_and_sigterm_exit_codes():
    """SIGTERM is turned into SIGINT (the test below sends SIGTERM, so it covers Ctrl-C's path too);
    they differ only in the exit code and the name in the last line."""
    from pctune import interrupts

    try:
        interrupts._received = None  # Ctrl-C
        assert (interrupts.exit_code(), interrupts.signal_name()) == (130, "SIGINT")
        interrupts._received = signal.SIGTERM
        assert (interrupts.exit_code(), interrupts.signal_name()) == (143, "SIGTERM")
    finally:
        interrupts._received = None


@pytest.mark.slow
def test_sigterm_stops_the_search_like_ctrl_c(tmp_path):
    """SIGTERM is what `timeout`, `kill` and `ray job stop` send: like Ctrl-C, trials stop, partial results
    and the exact resume command, the MLflow parent run KILLED, exit 143."""
    from mlflow import MlflowClient

    sig, code = signal.SIGTERM, 143

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    args = ["search", "demo", "--storage-path", str(tmp_path / "runs"), "--num-samples", "40", "--max-concurrent", "1",
            "--set", "data.num_images=300"]
    proc = subprocess.Popen([sys.executable, "-m", "pctune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "[joint] trial 3/" in line or time.time() > deadline:
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)
    out = "".join(seen) + out
    assert proc.returncode == code, out[-3000:] + err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"pctune: {sig.name}: the search of demo stopped after"), err[-3000:]
    assert f"continue it with `pctune {' '.join(args)} --resume`" in last
    assert "Stack trace" not in err and "SIGABRT" not in err
    run_dir = tmp_path / "runs" / "demo"
    board = (run_dir / "leaderboard.csv").read_text().splitlines()  # the partial results
    finished = [line for line in out.splitlines() if line.startswith("[joint]") and " trials in " in line]
    trials = sum(",trial," in row for row in board)
    assert finished and finished[-1].startswith(f"[joint] {trials} trials in ")  # the count the leaderboard has
    assert finished[-1].endswith(f"({40 - trials} of 40 not finished)")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("pctune-demo")
    parent = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parent] == ["KILLED"]
    assert json.loads((run_dir / "tracking.json").read_text())["search_id"]
    # issue 23 case 2: the run directory's lock is released on this path too (another writer needs no takeover)
    assert not (run_dir / ".pctune-lock").exists()
    from pctune.search.runlock import run_lock

    with run_lock(run_dir, "pctune sync demo", log=pytest.fail):
        pass


@pytest.mark.parametrize("uri, message", [
    ("foo://bar/baz", "MLflow cannot use the tracking URI 'foo://bar/baz' (Model registry functionality is unavailable"),
    ("sqlite:////proc/pctune-readonly/mlflow.db", "MLflow tracking store sqlite:////proc/pctune-readonly/mlflow.db is "
                                                  "not writable"),
])
def test_a_tracking_store_that_cannot_take_the_search_fails_before_any_trial(tmp_path, capsys, uri, message):
    assert main(["search", "demo", "--storage-path", str(tmp_path), "--num-samples", "1", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "demo").exists()  # checked before any trial: no run directory


@pytest.mark.parametrize("alpha", [1e6, 1e37])
def test_a_diverged_point_still_reports_its_feedforward_timestep(alpha):
    """Timestep 0 is the feedforward pass, measured before the dynamics diverge (it was reported as 0)."""
    import torch

    import pctune
    from pctune.data.demo import digits
    from pctune.search.objective import score

    torch.manual_seed(0)
    net = pctune.create_model("demo", gradient_scaling=True)
    x, y = digits("test")
    x, y = x[:96], y[:96]
    wild = score(net, x, y, net.hyperparameters({"beta": 0.5, "lambda": 0.2, "alpha": alpha}), timesteps=3,
                 batch_size=32)
    plain = score(net, x, y, net.hyperparameters("feedforward"), timesteps=3, batch_size=32)
    assert wild["diverged"] == 1
    assert wild["accuracy_t0"] == pytest.approx(plain["accuracy_t0"]) and plain["accuracy_t0"] > 0
    assert wild["ce_t0"] == pytest.approx(plain["ce_t0"], rel=1e-6)


PREDIFY_RESNET = """
gradient_scaling = false
input_size = [3, 64, 64]
[[pcoders]]
module = "layer1"
predictor = "ConvTranspose2d(64, 3, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))"
hyperparameters = {feedforward = 0.3, feedback = 0.3, pc = 0.01}
[[pcoders]]
module = "layer2"
predictor = "Sequential(Upsample(scale_factor=2.0), ConvTranspose2d(128, 64, kernel_size=3, padding=1))"
"""


def test_a_predify_config_builds_with_its_backbone_named_in_the_file_the_call_or_the_job(tmp_path):
    import pctune
    from pctune.errors import PctuneError
    from pctune.search.job import load_job
    from pctune.search.prepare import load_job_model

    bare = tmp_path / "bare.toml"
    bare.write_text(PREDIFY_RESNET)
    with pytest.raises(PctuneError, match="names no backbone"):
        pctune.create_model(bare)
    assert pctune.create_model(bare, backbone="torchvision/resnet18").num_pcoders == 2
    named = tmp_path / "named.toml"
    named.write_text('backbone = "torchvision/resnet18"\n' + PREDIFY_RESNET)
    assert pctune.create_model(named).encoder_modules == ["layer1", "layer2"]
    job = tmp_path / "job.toml"
    job.write_text(f'[model]\nname = "{bare}"\nbackbone = "torchvision/resnet18"\n[data]\nsource = "digits"\n'
                   '[search]\nspace = "demo"\n')
    spec, net = load_job_model(load_job(job), log=lambda _m: None)
    assert spec.backbone == "torchvision/resnet18" and net.num_pcoders == 2


@pytest.mark.parametrize("text, message", [
    ('[[pcoders]]\nmodule = "layer1"\nhyperparameters = "evil"\n', "pcoder1.hyperparameters: expected a table"),
    ('pcoders = ["layer1"]\n', "pcoder1: expected a [[pcoders]] table"),
    ('input_size = "big"\n[[pcoders]]\nmodule = "layer1"\n', "input_size must be [channels, height, width]"),
])
def test_a_malformed_predify_config_is_a_one_line_error(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["evaluate", "noise", "--model", str(path), "--hparams", "default", "--data", "digits",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_a_layer_asking_for_petabytes_is_refused_by_name(tmp_path):
    import pctune
    from pctune.errors import PctuneError

    spec = (ROOT / "pctune" / "models" / "specs" / "presnet18.toml").read_text()
    spec = spec.replace('module = "layer1"', 'module = "layer1"\ndecoder = { type = "ConvTranspose2d", '
                        'in_channels = 100000000, out_channels = 100000000, kernel_size = 2 }', 1)
    path = tmp_path / "huge.toml"
    path.write_text(spec)
    with pytest.raises(PctuneError, match=r"pcoder2.*ConvTranspose2d would have 4e\+16 parameters"):
        pctune.create_model(path)


def test_data_whose_classes_do_not_match_the_model_is_refused_before_any_trial(tmp_path, capsys):
    data = image_folder(tmp_path / "val", classes=2)
    assert main(["search", "demo", "--data", str(data), "--set", 'data.source="imagenet-val"', "--num-images", "4",
                 "--storage-path", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has 2 class folders but demo predicts 10 classes" in err, err


def test_an_unreadable_image_is_skipped_and_listed_or_fails_by_name(tmp_path):
    from pctune.data.subsets import load_val_subset
    from pctune.errors import PctuneError
    from pctune.search.job import load_job
    from pctune.search.prepare import load_job_model, noisy_images

    data = image_folder(tmp_path / "val", classes=10, per_class=2, corrupt=1)
    skipped: list[str] = []
    _images, labels = load_val_subset(data, 21, 0, image_size=16, unreadable=skipped)
    assert len(labels) == 20 and skipped == [str(data / "class00" / "broken0.png")]
    overrides = {"data.source": "imagenet-val", "data.path": str(data), "data.num_images": 21, "data.workers": 0,
                 "data.unreadable": "fail"}
    job = load_job("demo", overrides)
    spec, _net = load_job_model(job, log=lambda _m: None)
    with pytest.raises(PctuneError, match="broken0.png: cannot be read as an image"):
        noisy_images(job, spec, [])


@pytest.mark.parametrize("content", [b"\x00garbage, not a checkpoint", None])
def test_train_feedback_resume_from_an_unreadable_checkpoint_is_one_line(tmp_path, capsys, content):
    import torch

    data = image_folder(tmp_path / "train", ["n01440764", "n01443537"], per_class=1)
    out = tmp_path / "out"
    out.mkdir()
    if content is None:  # a pickle with more than tensors: refused without torch's "weights_only=False" advice
        torch.save({"model": "demo", "decoders": {}, "optimizer": {}, "history": [], "x": _Hostile(tmp_path / "m")},
                   out / "last.pt")
    else:
        (out / "last.pt").write_bytes(content)
    # presnet18: a model that takes RGB images (train-feedback reads folders as RGB; the demo's are grey)
    assert main(["train-feedback", "presnet18", "--data", str(data), "--out", str(out), "--epochs", "1", "--workers",
                 "0", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "last.pt: cannot be read as a PyTorch checkpoint" in err, err
    assert "weights_only=False" not in err and "weights_only" not in err
    assert not (tmp_path / "m").exists()


def test_a_flag_does_not_hide_an_invalid_value_in_the_job_file(tmp_path, capsys):
    job = demo_job(tmp_path).read_text().replace("num_samples = 40", "num_samples = -3")
    (tmp_path / "bad.toml").write_text(job)
    assert main(["search", str(tmp_path / "bad.toml"), "--num-samples", "2", "--storage-path", str(tmp_path)]) == 2
    assert "search.num_samples: must be >= 1, got -3" in capsys.readouterr().err


def test_a_data_folder_given_to_the_digits_demo_is_an_error_not_ignored(tmp_path, capsys):
    assert main(["search", "demo", "--data", "/does/not/exist", "--storage-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the digits source has its own images" in err


def test_the_printed_mlflow_line_opens_the_experiments_runs_view():
    from pctune.tracking.store import ui_command

    assert ui_command("http://127.0.0.1:5000/", "7") == "open http://127.0.0.1:5000/#/experiments/7/runs in a browser"
    assert ui_command("sqlite:///x/mlflow.db", "3").endswith("then open http://127.0.0.1:5000/#/experiments/3/runs")


def test_an_error_is_one_line_on_stderr_with_nothing_before_it(tmp_path):
    """No library warning (MLflow's type-hint notice was one) may precede the one-line error."""
    (tmp_path / "afile").write_text("")
    result = subprocess.run([sys.executable, "-m", "pctune.cli", "search", "demo", "--storage-path",
                             str(tmp_path / "afile")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"pctune: error: run.storage_path: {tmp_path / 'afile'} is a file, not a folder"]


def test_sync_of_a_search_whose_every_trial_diverged_registers_nothing_and_succeeds(tmp_path):
    """It warned "attempt to get argmin of an empty sequence" and `pctune sync` ended in a traceback."""
    from mlflow import MlflowClient

    fake_run_dir(tmp_path / "runs" / "fake", [30.0, 30.0, 30.0], combination=None, diverged=-2)
    job = tmp_path / "fake.toml"
    job.write_text(f'[model]\nname = "demo"\n[data]\nsource = "digits"\n[search]\nspace = "demo"\n'
                   f'[run]\nstorage_path = "{tmp_path}/runs"\n')
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = subprocess.run([sys.executable, "-m", "pctune.cli", "sync", str(job), "--tracking-uri", uri],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no champion registered: no configuration finished without diverging" in result.stdout
    assert "argmin" not in result.stderr and "Traceback" not in result.stderr
    client = MlflowClient(uri)
    assert not client.search_registered_models()
    children = client.search_runs([client.get_experiment_by_name("fake").experiment_id],
                                  "tags.`pctune.trial_id` != ''")
    assert len(children) == 3
