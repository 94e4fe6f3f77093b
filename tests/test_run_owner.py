"""One owner per run directory (issue 23, cases 2, 7 and, of case 11, "a refused search leaves an empty
run folder"): the lock a search, a promotion and a sync hold, its stale-lock rule and its race, and
the manifest that ``--overwrite`` follows."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import demo_job, image_folder

from pctune.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _tracking_in_tmp(tmp_path, monkeypatch):
    """A local store per test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def _cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pctune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or dict(os.environ), **kwargs)


@pytest.mark.slow
def test_a_second_search_on_the_same_storage_is_refused_naming_the_owner(tmp_path):
    """Case 2: two searches of the demo on one storage path at once, the second with --overwrite: the
    second exits 2 with one line naming the first (command, pid, host) and removes nothing; the first
    finishes with all its trials and one MLflow parent run."""
    from mlflow import MlflowClient

    storage, samples = tmp_path / "runs", 6
    first = _cli("search", "demo", "--storage-path", str(storage), "--num-samples", str(samples),
                 "--set", "data.num_images=300")
    run_dir = storage / "demo"
    _wait_for(run_dir / "job.json", first)  # the first has claimed the folder and started its search
    before = _listing(run_dir)
    second = _cli("search", "demo", "--storage-path", str(storage), "--overwrite", "--num-samples", "2")
    _out, err = second.communicate(timeout=300)
    assert second.returncode == 2, err[-3000:]
    line = err.strip()
    assert line.count("\n") == 0 and line.startswith(f"pctune: error: {run_dir} is in use by `pctune search demo`")
    assert f"pid {first.pid} on {socket.gethostname()}" in line
    assert set(before) <= set(_listing(run_dir))  # nothing of the first search removed
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert f"[joint] {samples} trials in " in out
    trials = [p for p in (run_dir / "joint").iterdir() if p.is_dir()]
    assert len(trials) == samples and all((t / "result.json").stat().st_size for t in trials)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("pctune-demo")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["FINISHED"]
    assert len(runs) - 1 == samples
    assert not (run_dir / ".pctune-lock").exists()  # released at the end


def _hold_lock(run_dir: Path, command: str = "pctune search demo") -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock until its stdin closes."""
    code = ("import sys; from pctune.search.runlock import run_lock\n"
            f"with run_lock({str(run_dir)!r}, {command!r}):\n    print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("command", [["promote", "demo", "--stages", "noise"], ["sync", "demo"],
                                     ["search", "demo", "--overwrite", "--num-samples", "1"]])
def test_promote_sync_and_overwrite_are_refused_while_another_process_writes_the_run(tmp_path, capsys, command):
    """Case 2: `pctune promote`, `pctune sync` and `pctune search --overwrite` against a run directory
    another process holds: one line naming the owner, exit 2, nothing touched."""
    from pctune.search.rundir import RunDir

    run_dir = RunDir(tmp_path / "runs" / "demo")
    run_dir.mark()
    run_dir.write_json("job.json", {"name": "demo"})
    holder = _hold_lock(run_dir.path)
    try:
        before = _listing(run_dir.path)
        assert main([*command, "--storage-path", str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        assert err.startswith(f"pctune: error: {run_dir.path} is in use by `pctune search demo` (pid {holder.pid} on "
                              f"{socket.gethostname()}, since ")
        assert _listing(run_dir.path) == before
    finally:
        holder.communicate("")
    assert not (run_dir / ".pctune-lock").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant_lock(run_dir: Path, host: str, pid: int, age_s: float = 0.0) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".pctune-lock"
    lock.write_text(json.dumps({"host": host, "pid": pid, "command": "pctune search demo",
                                "since": "2026-01-01 00:00:00 UTC", "token": "old"}))
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


@pytest.mark.parametrize("host, age_s, reason", [
    ("this", 0.0, "that process is gone"),  # this host, its pid gone
    ("elsewhere.example", 3600.0, "no heartbeat for 60 min"),  # another host, heartbeat an hour old
])
def test_a_stale_lock_is_taken_over_with_a_log_line(tmp_path, host, age_s, reason):
    """Case 2: a stale lock (a dead pid on this host; another host without a heartbeat for longer than
    the limit) is taken over, and a line says so; released, the lock file is gone."""
    from pctune.search.runlock import read_owner, run_lock

    run_dir = tmp_path / "demo"
    lock = _plant_lock(run_dir, socket.gethostname() if host == "this" else host, _dead_pid(), age_s)
    lines = []
    with run_lock(run_dir, "pctune sync demo", lines.append):
        owner = read_owner(lock)
        assert owner["pid"] == os.getpid() and owner["command"] == "pctune sync demo"
    assert len(lines) == 1 and lines[0].startswith(f"taking over the stale lock of {run_dir.resolve()} "
                                                   "(`pctune search demo` (pid ")
    assert lines[0].endswith(f": {reason})")
    assert not lock.exists() and sorted(p.name for p in run_dir.iterdir()) == []


def test_a_live_lock_on_another_host_is_respected(tmp_path):
    """Case 2: another host's lock with a fresh heartbeat is not stale (its pid means nothing here)."""
    from pctune.errors import PctuneError
    from pctune.search.runlock import run_lock

    run_dir = tmp_path / "demo"
    lock = _plant_lock(run_dir, "elsewhere.example", _dead_pid(), age_s=5)
    owner = r"is in use by `pctune search demo` \(pid \d+ on elsewhere.example, since 2026-01-01 00:00:00 UTC\)"
    with pytest.raises(PctuneError, match=owner), run_lock(run_dir, "pctune promote demo"):
        pass
    assert json.loads(lock.read_text())["token"] == "old"


def test_the_lock_is_reentrant_and_released_on_every_exit(tmp_path):
    """Case 2: a search that syncs and promotes holds the lock throughout (re-entrant in a process);
    it is released after an error and after Ctrl-C, and a folder it created is removed if left empty."""
    from pctune.errors import PctuneError
    from pctune.search.runlock import run_lock

    run_dir = tmp_path / "new" / "demo"
    for error in (PctuneError("refused"), KeyboardInterrupt()):
        with pytest.raises(type(error)), run_lock(run_dir, "pctune search demo"):
            with run_lock(run_dir, "pctune sync demo"):
                assert (run_dir / ".pctune-lock").is_file()
            assert (run_dir / ".pctune-lock").is_file()  # the outer hold still holds it
            raise error
        assert not (tmp_path / "new").exists()  # created by this command and left empty: removed


def test_the_heartbeat_keeps_a_held_lock_fresh(tmp_path, monkeypatch):
    """Case 2: while held, the lock's mtime is refreshed (what another host reads as the heartbeat), and
    `check_free` (a check that takes nothing) reports the live owner the way a second writer is told."""
    from pctune.errors import PctuneError
    from pctune.search import runlock

    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.1)
    run_dir = tmp_path / "demo"
    holder = _hold_lock(run_dir)
    try:
        with pytest.raises(PctuneError, match=f"is in use by `pctune search demo` \\(pid {holder.pid} on "):
            runlock.check_free(run_dir)
    finally:
        holder.communicate("")
    runlock.check_free(run_dir)  # free again
    with runlock.run_lock(run_dir, "pctune search demo"):
        lock = run_dir / ".pctune-lock"
        os.utime(lock, (time.time() - 3600, time.time() - 3600))
        time.sleep(0.5)
        assert time.time() - lock.stat().st_mtime < 5


def _race(run_dir: str, start: float, results) -> None:
    from pctune.errors import PctuneError
    from pctune.search.runlock import run_lock

    time.sleep(max(0.0, start - time.time()))
    try:
        with run_lock(run_dir, f"racer {os.getpid()}", lambda _m: None):
            results.put("won")
            time.sleep(2)
    except PctuneError:
        results.put("lost")


@pytest.mark.parametrize("stale", [False, True])
def test_processes_acquiring_at_once_exactly_one_wins(tmp_path, stale):
    """Case 2: eight processes take the lock at the same moment (of a free run directory, and of one
    whose lock is stale, so all of them try to take it over): exactly one wins."""
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    if stale:
        _plant_lock(run_dir, socket.gethostname(), _dead_pid())
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    start = time.time() + 1.0
    procs = [ctx.Process(target=_race, args=(str(run_dir), start, results)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["lost"] * 7 + ["won"]
    assert sorted(p.name for p in run_dir.iterdir()) == []  # no lock, no stale lock moved aside, left


@pytest.mark.slow
def test_overwrite_removes_exactly_what_pctune_wrote_and_refuses_on_anything_else(tmp_path, capsys):
    """Case 7: every file and folder a search (and its sync) writes is in the run directory's manifest;
    `--overwrite` of a run that holds notes.md (at the top, or inside joint/) refuses naming it and
    removes nothing; an overwrite refused by a later check removes nothing either; of a clean run it
    removes exactly the manifest's entries."""
    storage = tmp_path / "runs"
    run_dir = storage / "demo"
    search = ["search", "demo", "--storage-path", str(storage), "--num-samples", "2", "--set", "data.num_images=60"]
    assert main(search) == 0
    capsys.readouterr()
    for notes in (run_dir / "notes.md", run_dir / "joint" / "notes.md"):
        notes.write_text("keep")
        before = _listing(run_dir)
        assert main([*search, "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        name = str(notes.relative_to(run_dir))
        assert err == (f"pctune: error: {run_dir} holds files pctune did not write ({name}): --overwrite removed "
                       "nothing; move them out of the folder (or choose another --storage-path) and run it again")
        assert _listing(run_dir) == before and notes.read_text() == "keep"
        notes.unlink()
    entries = set(json.loads((run_dir / ".pctune-run").read_text())["entries"])  # the manifest
    assert entries == {p.name for p in run_dir.iterdir()} - {".pctune-run"}  # nothing written unlisted
    assert {"job.json", "references.json", "joint", ".joint.tune-state.json", "summary", "tracking.json"} <= entries
    before = _listing(run_dir)
    assert main([*search, "--overwrite", "--cpus-per-trial", "64"]) == 2  # refused after Ray started
    assert "search.resources.cpu = 64" in capsys.readouterr().err and _listing(run_dir) == before
    assert main([*search, "--overwrite"]) == 0
    out = capsys.readouterr().out
    removed = ", ".join(sorted(n for n in entries if not n.startswith(".")))
    assert f"replaced the earlier search in {run_dir} (removed: {removed})" in out


def test_overwrite_of_an_older_run_without_a_manifest_follows_the_known_names(tmp_path, capsys):
    """Case 7: a run directory of an older pctune (the marker as plain text, no manifest) is judged by
    the names pctune's files have: a notes.md makes --overwrite refuse naming it."""
    run_dir = tmp_path / "runs" / "demo"
    (run_dir / "joint").mkdir(parents=True)
    (run_dir / ".pctune-run").write_text("created by pctune: `--overwrite` may replace this folder\n")
    (run_dir / "job.json").write_text("{}")
    (run_dir / "notes.md").write_text("keep")
    before = _listing(run_dir)
    assert main(["search", "demo", "--storage-path", str(tmp_path / "runs"), "--overwrite", "--num-samples", "1"]) == 2
    assert "holds files pctune did not write (notes.md)" in capsys.readouterr().err
    assert _listing(run_dir) == before


@pytest.mark.parametrize("how", [pytest.param("resources", marks=pytest.mark.slow), "data"])
def test_a_refused_search_leaves_no_folder(tmp_path, capsys, how):
    """Case 11: a search refused by a check after the run directory would have been claimed (a trial
    asking for more CPUs than Ray has; a data folder whose classes do not fit the model) exits 2 and
    leaves no run folder (nor the storage folder it created)."""
    storage = tmp_path / "runs"
    if how == "resources":
        args = ["search", "demo", "--cpus-per-trial", "64"]
    else:
        data = image_folder(tmp_path / "val", classes=3)
        job = demo_job(tmp_path)
        job.write_text(job.read_text().replace('source = "digits"', 'source = "imagenet-val"'))
        args = ["search", str(job), "--data", str(data)]
    assert main([*args, "--storage-path", str(storage), "--num-samples", "1", "--set", "data.num_images=30"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("pctune: error: "), err  # (Ray's own start-up lines may precede it)
    assert not (storage / "demo").exists() and not storage.exists()
