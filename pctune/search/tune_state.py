"""Tune's experiment state, kept safe from a killed driver.

Tune saves its experiment-level state (``experiment_state-<session>.json``, the searcher's state) into
a staging folder after every step, rewriting the JSON in place, and copies it to the experiment folder
in the background. A driver killed while either happens leaves a file cut short, or files of different
steps; Tune then starts the experiment over, or its searcher waits forever for a trial the experiment
state does not know. So after every step that changed a trial, pctune snapshots the staging folder's
state files (complete and consistent at that moment) into one JSON file, replaced atomically, and
``--resume`` puts that snapshot back before Tune restores.

This relies on Tune's file names, which are not a public interface: they are checked against the Ray
versions this was written and tested for (:data:`TESTED_RAY`), and on any other version a warning says
so once. The snapshot is data (file contents, base64), never unpickled by pctune; the searcher's own
state file inside it is Ray's pickle, which Ray loads on restore (see the README's trust boundary).
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from pctune.search.manifest import register
from pctune.utils import atomic_write_json

Log = Callable[[str], None]

#: Ray versions whose Tune state files (names and staging folder) this module was checked against.
TESTED_RAY = ("2.60",)
STATE_FILES = ("experiment_state-*.json", "searcher-state-*.pkl", "search_gen_state-*.json")
SNAPSHOT_FORMAT = "pctune-tune-state-v2"
_warned: set[str] = set()


def check_ray_version(log: Log) -> None:
    """Warn once when the installed Ray is not one the state handling was checked against."""
    import ray

    version = ray.__version__
    if not version.startswith(TESTED_RAY) and version not in _warned:
        _warned.add(version)
        log(f"warning: Ray {version} is not one pctune's resume handling was tested with "
            f"({', '.join(TESTED_RAY)}.x); --resume after a killed driver may start a stage over")


def snapshot_path(exp_dir: Path) -> Path:
    return exp_dir.parent / f".{exp_dir.name}.tune-state.json"


def _state_files(folder: Path) -> list[Path]:
    return sorted(f for pattern in STATE_FILES for f in folder.glob(pattern) if f.is_file())


def _session(name: str) -> str:
    """The driver session's start time in a state file's name (they sort in time order)."""
    match = re.search(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", name)
    return match.group(0) if match else ""


def _parses(data: bytes | str) -> bool:
    try:
        json.loads(data)
        return True
    except ValueError:
        return False


def snapshot(staging: Path, exp_dir: Path) -> bool:
    """Snapshot the newest session's state files of ``staging`` (Tune's driver staging folder)."""
    states = sorted(staging.glob(STATE_FILES[0]))
    if not states:
        return False
    session = _session(states[-1].name)
    files = {f.name: f.read_bytes() for f in _state_files(staging) if _session(f.name) == session}
    if not _parses(files[states[-1].name]):
        return False
    register(exp_dir.parent, snapshot_path(exp_dir).name)
    atomic_write_json(snapshot_path(exp_dir), {
        "format": SNAPSHOT_FORMAT, "session": session,
        "files": {name: base64.b64encode(data).decode("ascii") for name, data in files.items()}}, indent=None)
    return True


def _read_snapshot(exp_dir: Path) -> dict | None:
    try:
        data = json.loads(snapshot_path(exp_dir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != SNAPSHOT_FORMAT:
        return None
    return data


def repair(exp_dir: Path, log: Log) -> None:
    """Before a resume: put back the last snapshot of Tune's state, replacing what a killed driver left
    in ``exp_dir``. Trials that finished after it are rerun by Tune under their own ids and replayed
    from their results, so nothing is evaluated twice. With no snapshot and an unreadable state (the
    driver died before its first step), the stage is moved aside and starts over."""
    states = sorted(exp_dir.glob(STATE_FILES[0]))
    damaged = bool(states) and not _parses(states[-1].read_bytes())
    saved = _read_snapshot(exp_dir)
    if saved is None:
        if damaged:
            aside = exp_dir.with_name(f"{exp_dir.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            register(exp_dir.parent, aside.name)
            exp_dir.rename(aside)
            log(f"[{exp_dir.name}] Tune's state is unreadable and has no snapshot; moved to {aside.name}, "
                "starting this stage over")
        return
    for f in _state_files(exp_dir):  # state of a later session that never got as far as a snapshot
        if _session(f.name) > saved["session"]:
            f.unlink()
    for name, data in saved["files"].items():
        if Path(name).name == name and name.startswith(("experiment_state-", "searcher-state-", "search_gen_state-")):
            (exp_dir / name).write_bytes(base64.b64decode(data))
    if damaged:
        log(f"[{exp_dir.name}] {states[-1].name} was cut short by the killed driver; "
            "restored its last complete copy")
