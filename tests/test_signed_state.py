"""Signed resume state (issue 23, case 5): a pickle planted in a run directory never runs on
``--resume``; the Tune state pctune saved is checked against an HMAC whose key is kept outside the
run directory. Real searches (subprocesses, real Ray), real files."""

import base64
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pctune.errors import PctuneError

ARGS = ["--num-samples", "12", "--max-concurrent", "1", "--set", "data.num_images=200"]


class _Hostile:
    """Unpickling this writes the marker file (what a planted pickle could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _start(storage: Path, *extra: str) -> subprocess.Popen:
    """``pctune search demo`` in its own process group (in a folder of its own: ``-m`` puts the current
    folder first on the path, and the code under test is the one PYTHONPATH names)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{storage.parent}/mlflow.db"}
    return subprocess.Popen([sys.executable, "-m", "pctune.cli", "search", "demo", "--storage-path", str(storage),
                             *ARGS, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, cwd=storage.parent)


def _search(storage: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """:func:`_start`, waited for; the whole process group is killed after ``timeout`` (a hang)."""
    proc = _start(storage, *extra)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, "timeout", out, err)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A demo search stopped by Ctrl-C after its second trial: its run directory holds Tune's state and
    pctune's signed snapshot of it."""
    storage = tmp_path_factory.mktemp("signed") / "runs"
    proc = _start(storage)
    deadline = time.time() + 240
    for line in proc.stdout:
        if "[joint] trial 2/" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    return storage


def _copy(storage: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs"
    shutil.copytree(storage, copy, symlinks=True)
    return copy


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("pctune:")]


@pytest.mark.slow
def test_a_pickle_planted_as_tuner_pkl_is_refused_and_never_loaded(interrupted, tmp_path):
    """Case 5: joint/tuner.pkl replaced by a hostile pickle: `--resume` exits 2 with one line naming
    it; the pickle never runs."""
    storage = _copy(interrupted, tmp_path)
    marker = tmp_path / "executed"
    tuner = storage / "demo" / "joint" / "tuner.pkl"
    tuner.write_bytes(pickle.dumps(_Hostile(marker)))
    result = _search(storage, "--resume", timeout=150)
    assert not marker.exists(), "the planted pickle ran"
    assert result.returncode == 2, result.stderr[-3000:]
    assert _errors(result.stderr) == [_errors(result.stderr)[-1]] and "Traceback" not in result.stderr
    assert str(tuner) in _errors(result.stderr)[-1] and "changed after pctune wrote it" in result.stderr


@pytest.mark.slow
def test_a_searcher_state_planted_in_the_snapshot_is_refused_and_never_loaded(interrupted, tmp_path):
    """Case 5: base64 of a hostile pickle put into the JSON snapshot as the searcher's state (which
    pctune writes back out for Ray to unpickle): `--resume` exits 2 with one line naming the
    snapshot, nothing runs, nothing hangs."""
    storage = _copy(interrupted, tmp_path)
    marker = tmp_path / "executed"
    path = storage / "demo" / ".joint.tune-state.json"
    saved = json.loads(path.read_text())
    [name] = [n for n in saved["files"] if n.startswith("searcher-state-")]
    saved["files"][name] = base64.b64encode(pickle.dumps(_Hostile(marker))).decode()
    path.write_text(json.dumps(saved))
    result = _search(storage, "--resume", timeout=150)
    assert not marker.exists(), "the planted pickle ran"
    assert result.returncode == 2, result.stderr[-3000:]
    assert _errors(result.stderr) == [_errors(result.stderr)[-1]] and "Traceback" not in result.stderr
    assert str(path) in _errors(result.stderr)[-1] and "signature does not match its content" in result.stderr
    assert not list((storage / "demo" / "joint").glob("searcher-state-*.pkl")) or all(
        b"pwned" not in f.read_bytes() for f in (storage / "demo" / "joint").glob("*.pkl"))


def _exp_dir(storage: Path, tmp_path: Path) -> Path:
    return _copy(storage, tmp_path) / "demo" / "joint"


def _untouched(exp_dir: Path):
    """The folder's files and contents, to show that a refused repair changed nothing."""
    return {p.relative_to(exp_dir): p.read_bytes() for p in sorted(exp_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_byte_changed_in_the_snapshot_is_refused(interrupted, tmp_path):
    """Case 5: one byte of the signed content changed (a state file, or the session) is refused."""
    from pctune.search.tune_state import repair, snapshot_path

    exp_dir = _exp_dir(interrupted, tmp_path)
    path = snapshot_path(exp_dir)
    text = path.read_text()
    saved = json.loads(text)
    name = next(n for n in saved["files"] if n.startswith("experiment_state-"))
    data = bytearray(base64.b64decode(saved["files"][name]))
    data[len(data) // 2] ^= 1
    saved["files"][name] = base64.b64encode(bytes(data)).decode()
    before = _untouched(exp_dir)
    session = saved["session"]
    other = session[:-1] + ("8" if session.endswith("9") else "9")  # one character changed, whatever it was
    for tampered in (json.dumps(saved), text.replace(session, other)):
        path.write_text(tampered)
        with pytest.raises(PctuneError, match="signature does not match its content") as error:
            repair(exp_dir, print)
        assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert _untouched(exp_dir) == before


@pytest.mark.slow
def test_a_snapshot_signed_with_another_key_or_unsigned_is_refused(interrupted, tmp_path, monkeypatch):
    """Case 5: a snapshot is accepted only under the key that signed it; an older pctune's unsigned one
    ("pctune-tune-state-v2") cannot be resumed safely, and says how to start over."""
    from pctune.search.tune_state import repair, snapshot_path, verified_state

    exp_dir = _exp_dir(interrupted, tmp_path)
    assert verified_state(exp_dir) is not None
    monkeypatch.setenv("PCTUNE_STATE_KEY", "another key, at least 32 characters long")
    with pytest.raises(PctuneError, match=r"signed with another key than \$PCTUNE_STATE_KEY"):
        repair(exp_dir, print)
    monkeypatch.delenv("PCTUNE_STATE_KEY")
    path = snapshot_path(exp_dir)
    old = json.loads(path.read_text())
    path.write_text(json.dumps({"format": "pctune-tune-state-v2", "session": old["session"], "files": old["files"]}))
    with pytest.raises(PctuneError, match="older pctune, without a signature.*start the search over with --overwrite"):
        repair(exp_dir, print)


@pytest.mark.slow
def test_a_stage_without_a_snapshot_is_never_restored_from_its_unsigned_files(interrupted, tmp_path):
    """Case 5: no snapshot (the driver died before its first step): the stage is moved aside and
    starts over; its tuner.pkl is never loaded."""
    from pctune.search.tune_state import repair, snapshot_path

    exp_dir = _exp_dir(interrupted, tmp_path)
    snapshot_path(exp_dir).unlink()
    marker = tmp_path / "executed"
    (exp_dir / "tuner.pkl").write_bytes(pickle.dumps(_Hostile(marker)))
    lines = []
    repair(exp_dir, lines.append)
    assert not exp_dir.exists() and not marker.exists()
    assert "has no signed snapshot" in lines[-1] and len(list(exp_dir.parent.glob("joint.damaged-*"))) == 1


@pytest.mark.slow
def test_repair_leaves_only_signed_pickles_for_ray(interrupted, tmp_path):
    """Case 5: any other pickle Ray would load (a later session's state, callback state, a trial's
    error.pkl) is removed before the restore; the signed files are written back."""
    from pctune.search.tune_state import repair, verified_state

    exp_dir = _exp_dir(interrupted, tmp_path)
    _session, files = verified_state(exp_dir)
    planted = [exp_dir / "searcher-state-2099-01-01_00-00-00.pkl", exp_dir / "callback-states-2099-01-01_00-00-00.pkl",
               exp_dir / "search_gen_state-2099-01-01_00-00-00.json", exp_dir / "other.pkl"]
    trial = next(p for p in exp_dir.iterdir() if p.is_dir())
    planted.append(trial / "error.pkl")
    for path in planted:
        path.write_bytes(b"planted")
    repair(exp_dir, print)
    assert not any(p.exists() for p in planted)
    assert {p.name: p.read_bytes() for p in exp_dir.iterdir() if p.is_file() and p.suffix in (".pkl", ".json")
            and not p.name.startswith(".")} == files


def test_the_key_file_is_created_private_and_refused_when_others_can_read_it(tmp_path, monkeypatch):
    """Case 5: the key lives in the user's configuration directory (never the run directory), made
    0600 on first use; a key file others can read or write, or a short $PCTUNE_STATE_KEY, is refused."""
    from pctune.search import signing

    monkeypatch.delenv("PCTUNE_STATE_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setattr(signing, "_cache", {})
    key = signing.state_key()
    path = tmp_path / "config" / "pctune" / "state.key"
    assert signing.key_path() == path and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip().encode() == key and len(bytes.fromhex(key.decode())) == 32
    assert signing.state_key() == key  # the same key again, not a new one
    path.chmod(0o644)
    monkeypatch.setattr(signing, "_cache", {})
    with pytest.raises(PctuneError, match=r"readable or writable by others \(mode 0644") as error:
        signing.state_key()
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    monkeypatch.setenv("PCTUNE_STATE_KEY", "too short")
    with pytest.raises(PctuneError, match="PCTUNE_STATE_KEY must be at least 32 characters"):
        signing.state_key()
    monkeypatch.setenv("PCTUNE_STATE_KEY", "k" * 40)
    assert signing.state_key() == b"k" * 40  # the cluster's secret wins over the (refused) file


@pytest.mark.slow
def test_an_interrupted_search_resumes_with_its_signed_state(interrupted):
    """Case 5: the normal path: a search stopped by Ctrl-C resumes from its signed state and finishes,
    and the state it leaves is signed again. (Runs last: it finishes the fixture's search.)"""
    from pctune.search.tune_state import verified_state

    exp_dir = interrupted / "demo" / "joint"
    done_before = sum(1 for p in exp_dir.glob("*/result.json") if p.read_text().strip())
    session_before, _ = verified_state(exp_dir)
    result = _search(interrupted, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[joint] restoring" in result.stdout and "no signed snapshot" not in result.stdout
    trials = [p for p in exp_dir.glob("*/result.json") if p.read_text().strip()]
    assert len(trials) == 12 and done_before >= 2
    session, files = verified_state(exp_dir)  # signed again by the resumed session, with every trial in it
    assert session > session_before and (exp_dir / "tuner.pkl").read_bytes() == files["tuner.pkl"]
    state = json.loads(next(data for name, data in files.items() if name.startswith("experiment_state-")))
    assert len(state["trial_data"]) == 12
