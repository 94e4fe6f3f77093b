"""Clean stops (issue 23): SIGTERM to the whole process group, as `timeout`, Kubernetes and systemd send
it (case 4); a full disk under the run directory (case 6); a resource check that fails before Ray
starts (case 11). Real Ray, MLflow, PyTorch and files; each command runs in a session of its own and
the signal goes to that session's process group with ``os.killpg``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_RGB_SPEC, demo_job, image_folder

ROOT = Path(__file__).resolve().parents[1]
RAY_PROCESSES = ("gcs_server", "raylet")


# -- running a command in a session of its own --------------------------------------------------------
class Command:
    """``python -m pctune.cli ARGS`` in a new session (its process group is its pid), stdout read line by
    line, stderr into a file."""

    def __init__(self, tmp_path: Path, args: list[str], uri: str) -> None:
        self.args = args
        self.stderr_path = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "pctune.cli", *args], stdout=subprocess.PIPE,
                                     stderr=self.stderr_path.open("w"), text=True, env=env, cwd=tmp_path,
                                     start_new_session=True)
        self.out: list[str] = []

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        for line in self.proc.stdout:
            self.out.append(line)
            if text in line:
                return
            if time.time() > deadline:
                break
        raise AssertionError(f"never saw {text!r}:\n{''.join(self.out)[-3000:]}\n{self.stderr()[-3000:]}")

    def signal_group(self, sig: int = signal.SIGTERM) -> set[int]:
        """Send ``sig`` to the command's whole process group; returns the Ray processes it had started."""
        ray = ray_descendants(self.proc.pid)
        os.killpg(self.proc.pid, sig)
        return ray

    def finish(self, timeout: float = 240) -> int:
        out, _ = self.proc.communicate(timeout=timeout)
        self.out.append(out)
        return self.proc.returncode

    def stdout(self) -> str:
        return "".join(self.out)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def last_line(self) -> str:
        lines = self.stderr().strip().splitlines()
        return lines[-1] if lines else ""


def run(tmp_path: Path, args: list[str], uri: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([sys.executable, "-m", "pctune.cli", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=timeout)


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command name) of every live (non-zombie) process."""
    table = {}
    for line in subprocess.run(["ps", "-eo", "pid=,ppid=,stat=,comm="], capture_output=True, text=True).stdout.splitlines():
        pid, ppid, stat, comm = line.split(None, 3)
        if not stat.startswith("Z"):
            table[int(pid)] = (int(ppid), comm.strip())
    return table


def ray_descendants(root: int) -> set[int]:
    """The GCS and raylet processes among ``root``'s descendants."""
    table = processes()
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return {pid for pid in found if table[pid][1] in RAY_PROCESSES}


def assert_gone(pids: set[int], timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = pids & set(processes())
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"Ray processes left behind: {alive}")


def parent_statuses(uri: str, experiment: str = "pctune-demo") -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return [r.info.status for r in runs if "mlflow.parentRunId" not in r.data.tags]


# -- case 4: SIGTERM to the process group ----------------------------------------------------------
@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_the_search_cleanly_and_resume_finishes_it(tmp_path):
    """Case 4: `timeout`/Kubernetes/systemd signal the whole group, Ray's processes included: the search
    stops after its finished trials, exit 143, the resume command last, the leaderboard kept, the MLflow
    parent KILLED, no Ray process left; `--resume` then completes it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["search", "demo", "--storage-path", str(tmp_path / "runs"), "--num-samples", "6", "--max-concurrent", "1",
            "--set", "data.num_images=300"]
    cmd = Command(tmp_path, args, uri)
    cmd.wait_for("[joint] trial 2/")
    started_ray = cmd.signal_group()
    assert started_ray, "expected the local Ray's processes under the driver"
    assert cmd.finish() == 143, cmd.stdout()[-3000:] + cmd.stderr()[-3000:]
    assert cmd.last_line().startswith("pctune: SIGTERM: the search of demo stopped after"), cmd.stderr()[-3000:]
    assert cmd.last_line().endswith(f"continue it with `pctune {' '.join(args)} --resume`")
    board = (tmp_path / "runs" / "demo" / "leaderboard.csv").read_text()
    kept = board.count(",trial,")
    assert 2 <= kept < 6, board
    assert parent_statuses(uri) == ["KILLED"]
    assert_gone(started_ray)

    resumed = run(tmp_path, [*args, "--resume"], uri)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    board = (tmp_path / "runs" / "demo" / "leaderboard.csv").read_text()
    assert board.count(",trial,") == 6, board
    assert parent_statuses(uri) == ["FINISHED"]


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory):
    """A small finished demo search (2 trials) whose promotion is cheap: one configuration, the
    generated ImageNet-C of 3 corruptions on 60 digits at 3 timesteps (16 shards)."""
    tmp_path = tmp_path_factory.mktemp("finished")
    job = demo_job(tmp_path)
    text = job.read_text().replace("timesteps = 10\nnum_images = 200", 'timesteps = 3\nnum_images = 60\n'
                                   'corruptions = ["gaussian_noise", "fog", "contrast"]')
    assert text != job.read_text()
    job.write_text(text)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = run(tmp_path, ["search", str(job), "--storage-path", str(tmp_path / "runs"), "--num-samples", "2",
                          "--set", "data.num_images=40"], uri)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp_path, job, uri


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_a_promotion_and_a_rerun_completes_it(finished_search):
    """Case 4: SIGTERM to `pctune promote`'s group during a stage run as Ray tasks (imagenet-c) was exit
    134 and Ray's native stack dump: now exit 143, one line saying how to go on, the finished shards
    kept, no Ray process left, and the same command again finishes the stage."""
    tmp_path, job, uri = finished_search
    args = ["promote", str(job), "--storage-path", str(tmp_path / "runs"), "--stages", "imagenet-c"]
    cmd = Command(tmp_path, args, uri)
    cmd.wait_for("imagenet-c: shard 1/")
    started_ray = cmd.signal_group()
    assert cmd.finish() == 143, cmd.stdout()[-3000:] + cmd.stderr()[-3000:]
    err = cmd.stderr()
    assert "Traceback" not in err and "Stack trace" not in err, err[-3000:]
    assert cmd.last_line().startswith("pctune: SIGTERM: the promotion of demojob stopped in rank1 imagenet-c"), err
    assert cmd.last_line().endswith(f"continue it with `pctune {' '.join(args)}`")
    shards = tmp_path / "runs" / "demojob" / "promotion" / "rank1" / "imagenet-c" / "shards"
    kept = {p.name for p in shards.glob("*.json")}
    assert 1 <= len(kept) < 16, kept
    assert not list(shards.glob("*.tmp"))
    assert_gone(started_ray)
    assert parent_statuses(uri) == ["FINISHED"]  # the search's parent run, untouched by the stopped promotion

    again = run(tmp_path, args, uri)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"16 shards, {len(kept)} already done" in again.stdout, again.stdout[-3000:]
    assert len(list(shards.glob("*.json"))) == 16
    assert parent_statuses(uri) == ["FINISHED"]  # logging the promotion reopens the parent, then closes it


@pytest.mark.slow
def test_sigterm_to_the_process_group_during_sync_is_a_clean_stop_or_a_finished_sync(finished_search):
    """Case 4: `pctune sync` signalled with its group: exit 143 with the command that continues it (the
    MLflow parent KILLED), or a sync that had already finished; never a traceback."""
    tmp_path, job, uri = finished_search
    args = ["sync", str(job), "--storage-path", str(tmp_path / "runs")]
    cmd = Command(tmp_path, args, uri)
    cmd.wait_for("MLflow: ")
    cmd.signal_group()
    code = cmd.finish()
    err = cmd.stderr()
    assert "Traceback" not in err, err[-3000:]
    assert code in (0, 143), cmd.stdout()[-3000:] + err[-3000:]
    if code == 143:
        assert cmd.last_line().startswith("pctune: SIGTERM: the sync of demojob stopped"), err
        assert cmd.last_line().endswith(f"continue it with `pctune {' '.join(args)}`")
        assert parent_statuses(uri) == ["KILLED"]
    again = run(tmp_path, args, uri)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert parent_statuses(uri) == ["FINISHED"]


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_train_feedback_and_resume_continues(tmp_path):
    """Case 4: SIGTERM to train-feedback's group (its DataLoader workers get it too): exit 143, the last
    finished epoch's checkpoint kept, the resume command last; `--resume` continues from it."""
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_RGB_SPEC)
    data = image_folder(tmp_path / "images", 3, per_class=20, size=40)
    out = tmp_path / "feedback"
    args = ["train-feedback", str(spec), "--data", str(data), "--out", str(out), "--epochs", "3", "--batch-size", "4",
            "--workers", "2"]
    cmd = Command(tmp_path, args, f"sqlite:///{tmp_path}/mlflow.db")
    cmd.wait_for("epoch 1: loss")
    cmd.signal_group()
    assert cmd.finish() == 143, cmd.stdout()[-3000:] + cmd.stderr()[-3000:]
    last = cmd.last_line()
    assert last.startswith("pctune: SIGTERM: the training of tiny-rgb stopped in epoch "), cmd.stderr()[-3000:]
    assert f"{out / 'last.pt'} holds epoch " in last
    assert last.endswith(f"continue it with `pctune {' '.join(args)} --resume`")
    assert "Traceback" not in cmd.stderr()
    assert (out / "last.pt").is_file() and not list(out.glob("*.tmp"))
    kept = int(last.split(" holds epoch ")[1].split(";")[0])

    resumed = run(tmp_path, [*args, "--resume"], f"sqlite:///{tmp_path}/mlflow.db")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {out / 'last.pt'} after epoch {kept}" in resumed.stdout
    assert "epoch 3: loss" in resumed.stdout and (out / "feedback.pt").is_file()


# -- case 11: a check that fails before Ray starts -------------------------------------------------
def test_a_resource_check_fails_before_ray_starts_with_exactly_one_line(tmp_path):
    """Case 11: `--cpus-per-trial 64` on a local Ray was three lines of Ray's logging, then the error:
    now the check is made before Ray starts (exactly one line on stderr, exit 2)."""
    done = run(tmp_path, ["search", "demo", "--storage-path", str(tmp_path / "runs"), "--cpus-per-trial", "64"],
               f"sqlite:///{tmp_path}/mlflow.db")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("pctune: error: ") and lines[0].endswith(
        f"search.resources.cpu = 64 per trial but the Ray cluster has {os.cpu_count()} (set --cpus-per-trial)")
    assert "Ray:" not in done.stdout  # no Ray was started


# -- case 6: a full disk ---------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 400 KB tmpfs (a demo search needs more), unmounted afterwards; the test can grow it."""
    mount_point = tmp_path / "store"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}): the full-disk case needs a "
                    "file system that fills up (run the tests as root, or where `mount -t tmpfs` is allowed)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_is_one_line_leaves_no_temporary_file_and_resume_finishes_after_freeing_space(tmp_path,
                                                                                                small_disk):
    """Case 6: a storage path that fills up mid-search was an OSError traceback, a `.tmp` file left and
    the MLflow parent RUNNING: now one line naming the file and what was written, exit 1, no temporary
    file, the parent not RUNNING; with more room, `--resume` finishes the search with every trial once."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["search", "demo", "--storage-path", str(small_disk), "--num-samples", "8", "--max-concurrent", "1",
            "--set", "data.num_images=40"]
    full = run(tmp_path, args, uri)
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 1, full.stdout[-3000:] + full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    assert lines[-1].startswith(f"pctune: error: cannot write {small_disk}/demo"), full.stderr[-3000:]
    assert lines[-1].endswith("): No space left on device"), lines[-1]
    assert not [p for p in small_disk.rglob("*") if ".tmp" in p.name]
    assert parent_statuses(uri) and "RUNNING" not in parent_statuses(uri)

    subprocess.run(["mount", "-o", "remount,size=8m", "tmpfs", str(small_disk)], check=True)
    resumed = run(tmp_path, [*args, "--resume"], uri)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    board = [row.split(",") for row in (small_disk / "demo" / "leaderboard.csv").read_text().splitlines()[1:]]
    trials = [row[2] for row in board if row[1] == "trial"]
    assert sorted(trials) == sorted(set(trials)) and len(trials) == 8, board
    assert parent_statuses(uri) == ["FINISHED"]
