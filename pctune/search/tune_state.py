"""Tune's experiment state, kept safe from a killed driver and signed against planted pickles.

Tune saves its experiment-level state (``experiment_state-<session>.json``, the searcher's state) into
a staging folder in the steps that need it, rewriting the JSON in place, and copies it to the experiment folder
in the background. A driver killed while either happens leaves a file cut short, or files of different
steps; Tune then starts the experiment over, or its searcher waits forever for a trial the experiment
state does not know. So after every step in which Tune saved (a trial added, paused or resumed:
:mod:`pctune.search.tune_patches`), pctune snapshots the staging folder's
state files (complete and consistent at that moment) into one JSON file, replaced atomically, and
``--resume`` puts that snapshot back before Tune restores.

Ray unpickles (or cloudpickle-decodes) these files of an experiment folder when it restores one:
``tuner.pkl`` (Tuner.restore), ``experiment_state-*.json`` (trials' non-JSON fields and the JSON
encoder's cloudpickle fallbacks; also read by ExperimentAnalysis), ``searcher-state-*.pkl`` (OptunaSearch),
``search_gen_state-*.json`` (a cloudpickle despite its name: SearchGenerator and ConcurrencyLimiter
state), ``callback-states-*.pkl`` (stateful callbacks) and, for a trial restored as ERROR, its
``error.pkl``; it copies every top-level ``*.json`` and ``*.pkl`` to where it loads them from. Trial
checkpoints are pctune's JSON (``running_sums.json``), never unpickled. So the snapshot carries all of
the top-level ones and an HMAC (:mod:`pctune.search.signing`, key outside the run directory); ``repair``
verifies it before it writes anything, removes every pickled file of the folder (and trials'
``error.pkl``: ``error.txt`` keeps the traceback), and writes the signed copies back: nothing unsigned
is left for Ray to load. A snapshot that fails the check is a one-line error and is never loaded.

This relies on Tune's file names, which are not a public interface: they are checked against the Ray
versions this was written and tested for (:data:`TESTED_RAY`), and on any other version a warning says
so once. pctune itself never unpickles anything here.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

from pctune.errors import PctuneError
from pctune.search.manifest import register
from pctune.search.signing import key_id, key_source, sign, state_key, verify
from pctune.utils import Log, atomic_write_bytes, atomic_write_json

#: Ray versions whose Tune state files (names and staging folder) this module was checked against.
TESTED_RAY = ("2.60",)
STATE_FILES = ("experiment_state-*.json", "searcher-state-*.pkl", "search_gen_state-*.json", "callback-states-*.pkl")
TUNER_FILE = "tuner.pkl"  # written once, when the Tuner is made
#: top-level files of an experiment folder that Ray may unpickle on restore (it copies every *.pkl along)
PICKLED = (TUNER_FILE, *STATE_FILES, "basic-variant-state-*.json", "*.pkl")
SNAPSHOT_FORMAT = "pctune-tune-state-v3"
UNSIGNED_FORMATS = ("pctune-tune-state-v2",)
_START_OVER = "start the search over with --overwrite"
_warned: set[str] = set()
_tuner_state: dict[str, bytes] = {}  # exp_dir -> its tuner.pkl, as this process wrote or verified it


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


def remember_tuner_state(exp_dir: Path, data: bytes | None = None) -> None:
    """What the snapshots of ``exp_dir`` carry as its ``tuner.pkl``: ``data`` (the verified copy a resume
    wrote back), else the file as Ray just wrote it (call this right after making a new Tuner). The
    callbacks are pickled into tuner.pkl, so this is kept here, in the driver process, not on them."""
    exp_dir = Path(exp_dir)
    _tuner_state[str(exp_dir)] = data if data is not None else (exp_dir / TUNER_FILE).read_bytes()


def snapshot(staging: Path, exp_dir: Path) -> bool:
    """Snapshot (signed) the newest session's state files of ``staging`` (Tune's driver staging folder)
    and the stage's ``tuner.pkl``."""
    exp_dir = Path(exp_dir)
    tuner = _tuner_state.get(str(exp_dir))
    states = sorted(staging.glob(STATE_FILES[0]))
    if tuner is None or not states:
        return False
    session = _session(states[-1].name)
    files = {f.name: f.read_bytes() for f in _state_files(staging) if _session(f.name) == session}
    if not _parses(files[states[-1].name]):
        return False
    _write_snapshot(exp_dir, session, {**files, TUNER_FILE: tuner})
    return True


def _write_snapshot(exp_dir: Path, session: str, files: dict[str, bytes]) -> None:
    key = state_key()
    register(exp_dir.parent, snapshot_path(exp_dir).name)
    atomic_write_json(snapshot_path(exp_dir), {
        "format": SNAPSHOT_FORMAT, "key_id": key_id(key), "hmac": sign(_signed(exp_dir.name, session, files), key),
        "stage": exp_dir.name, "session": session,
        "files": {name: base64.b64encode(data).decode("ascii") for name, data in files.items()}}, indent=None)


def _signed(stage: str, session: str, files: dict[str, bytes]) -> Iterator[bytes]:
    """What the HMAC covers: the format, the stage's name, the session and every file (name and bytes)."""
    yield from (SNAPSHOT_FORMAT.encode(), stage.encode(), session.encode())
    for name in sorted(files):
        yield name.encode()
        yield files[name]


def _well_formed(data: object, stage: str) -> bool:
    return (isinstance(data, dict) and isinstance(data.get("session"), str) and isinstance(data.get("files"), dict)
            and data.get("stage") == stage and TUNER_FILE in data["files"]
            and all(isinstance(v, str) and _state_name(k) for k, v in data["files"].items()))


def _state_name(name: object) -> bool:
    return isinstance(name, str) and Path(name).name == name and (
        name == TUNER_FILE or any(Path(name).match(pattern) for pattern in STATE_FILES))


def verified_state(exp_dir: Path) -> tuple[str, dict[str, bytes]] | None:
    """The session and files of ``exp_dir``'s snapshot after its signature checked out; None when there
    is no snapshot. A snapshot that is unreadable, unsigned (an older pctune's) or fails the check is a
    :class:`PctuneError` naming it."""
    path = snapshot_path(Path(exp_dir))
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        data = None
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt in UNSIGNED_FORMATS:
        raise PctuneError(f"{path}: Tune state saved by an older pctune, without a signature: resuming it could "
                          f"run code planted in it, so it cannot be resumed safely; {_START_OVER}")
    if fmt != SNAPSHOT_FORMAT or not _well_formed(data, Path(exp_dir).name):
        raise PctuneError(f"{path}: not a Tune state snapshot pctune wrote for this stage (unreadable or "
                          f"incomplete); not loading it; {_START_OVER}")
    key = state_key()
    if data.get("key_id") != key_id(key):
        raise PctuneError(f"{path}: Tune state signed with another key than {key_source()}; not loading it: "
                          f"resume with the key that started the search ($PCTUNE_STATE_KEY or its state.key), "
                          f"or {_START_OVER}")
    try:
        files = {name: base64.b64decode(text, validate=True) for name, text in data["files"].items()}
    except (binascii.Error, ValueError):
        files = None
    if files is None or not verify(_signed(data["stage"], data["session"], files), data.get("hmac"), key):
        raise PctuneError(f"{path}: signature does not match its content (the Tune state was changed after pctune "
                          f"wrote it); not loading it; {_START_OVER}")
    return data["session"], files


def _pickled_files(exp_dir: Path) -> list[Path]:
    found = {f for pattern in PICKLED for f in exp_dir.glob(pattern) if f.is_file() or f.is_symlink()}
    return sorted(found | {f for f in exp_dir.glob("*/error.pkl") if f.is_file() or f.is_symlink()})


def _check_tuner_file(exp_dir: Path, signed: bytes) -> None:
    """tuner.pkl never changes after Ray wrote it: one that differs from the signed copy was replaced."""
    path = exp_dir / TUNER_FILE
    if path.is_symlink() or (path.exists() and (path.stat().st_size != len(signed) or path.read_bytes() != signed)):
        raise PctuneError(f"{path}: differs from the copy pctune signed in {snapshot_path(exp_dir).name} (changed "
                          f"after pctune wrote it); not loading it: delete it to resume from the signed copy, "
                          f"or {_START_OVER}")


def repair(exp_dir: Path, log: Log) -> None:
    """Before a resume: verify the last snapshot of Tune's state and put it back, replacing what a killed
    driver (or anyone else) left in ``exp_dir``. Trials that finished after it are rerun by Tune under
    their own ids and replayed from their results, so nothing is evaluated twice. With no snapshot
    (the driver died before its first step) the stage is moved aside and starts over: its unsigned
    state is never restored (the first trial is snapshotted in the step that adds it, so at most the
    trials of that one step run again)."""
    exp_dir = Path(exp_dir)
    saved = verified_state(exp_dir)
    if saved is None:
        if _pickled_files(exp_dir):
            # (named like a stage whose state was cut short: a folder the run directory knows as pctune's)
            aside = exp_dir.with_name(f"{exp_dir.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            register(exp_dir.parent, aside.name)
            exp_dir.rename(aside)
            log(f"[{exp_dir.name}] Tune's state has no signed snapshot (the driver stopped before its first step); "
                f"moved to {aside.name}, starting this stage over")
        return
    _session_name, files = saved
    _check_tuner_file(exp_dir, files[TUNER_FILE])
    states = sorted(exp_dir.glob(STATE_FILES[0]))
    damaged = bool(states) and not _parses(states[-1].read_bytes())
    for f in _pickled_files(exp_dir):
        f.unlink()
    for name, data in files.items():  # atomically: a full disk leaves no file cut short to refuse later
        atomic_write_bytes(exp_dir / name, data)
    remember_tuner_state(exp_dir, files[TUNER_FILE])
    if damaged:
        log(f"[{exp_dir.name}] {states[-1].name} was cut short by the killed driver; "
            "restored its last complete copy")


