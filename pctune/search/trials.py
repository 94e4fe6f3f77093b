"""Reading a Ray Tune experiment folder without Ray: its trials (``params.json``, ``result.json``), their
results and the record of the trials a scheduler stopped early. The run directory
(:mod:`pctune.search.rundir`) reads its stages through these."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pctune.metrics import FIDELITY, METRIC
from pctune.search import manifest
from pctune.utils import atomic_write_json

_TRIAL_DIR = re.compile(r"^[A-Za-z0-9_]*?_[0-9a-f]{8}_(\d+)_")


@dataclass(frozen=True)
class Trial:
    """One trial of a Tune experiment; ``status`` is TERMINATED (its final result reported, or stopped
    early by the scheduler), ERROR or PENDING (not started, or still running: a partial result only).
    ``curve``: (images seen, running score) at each of its reports: of ``mean_ce``, or of the metric
    :func:`load_trials` was asked for."""

    trial_id: str
    folder: str
    index: int
    status: str
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    curve: tuple[tuple[int, float], ...] = ()
    stopped_early: bool = False

    @property
    def finished(self) -> bool:
        return self.status == "TERMINATED"


def is_final(metrics: dict[str, Any]) -> bool:
    """A trial's result is final once it covers every image or the dynamics diverged (results of
    pctune before multi-fidelity have no ``final`` key and are final)."""
    return bool(metrics.get("final", 1.0))


def load_trials(exp_dir: str | Path, curve_of: str = METRIC) -> list[Trial]:
    """Every trial of one Tune experiment folder, in creation order: its trial folders, and the trials
    whose results pctune's own record holds (:func:`read_result_log`); each trial's ``curve`` is that of
    ``curve_of``."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        return []
    stopped, logged = read_early_stops(exp_dir), read_result_log(exp_dir)
    folders = {f.name for f in exp_dir.iterdir() if f.is_dir() and (f / "params.json").is_file()} | set(logged)
    trials = [_read_trial(exp_dir / name, stopped, logged.get(name, []), curve_of) for name in folders]
    return sorted((t for t in trials if t is not None), key=lambda t: (t.index, t.folder))


def _read_trial(folder: Path, stopped: dict[str, int], logged: list[dict], curve_of: str) -> Trial | None:
    # a trial's reports: every one carries the fidelity (an objective's own metric may not be mean_ce)
    results = [r for r in read_results(folder / "result.json") if FIDELITY in r or METRIC in r]
    if logged and (not results or not _complete(results[-1], stopped)) and _complete(logged[-1], stopped):
        results = logged  # result.json cut short (a driver killed while Tune copied it): pctune's record
    config = results[-1].get("config") if results and results is logged else None
    try:
        config = config if config is not None else json.loads((folder / "params.json").read_text())
    except (OSError, ValueError):  # a params.json the killed driver left empty: the trial never started
        return None
    metrics = results[-1] if results else {}
    trial_id = metrics.get("trial_id", folder.name)
    early = bool(metrics) and not is_final(metrics) and trial_id in stopped
    if metrics and (is_final(metrics) or early):
        status = "TERMINATED"
    else:
        status = "ERROR" if any(folder.glob("error.*")) else "PENDING"
    match = _TRIAL_DIR.search(folder.name)
    curve = tuple((int(r.get(FIDELITY, 0)), float(r[curve_of])) for r in results if curve_of in r)
    return Trial(trial_id=trial_id, folder=folder.name, index=int(match.group(1)) if match else -1, status=status,
                 config=config, metrics=metrics, curve=curve, stopped_early=early)


def _complete(result: dict, stopped: dict[str, int]) -> bool:
    """A trial's last result that ends it: final, or one a scheduler stopped it at."""
    return is_final(result) or result.get("trial_id") in stopped


# -- pctune's own record of every result ------------------------------------------------------------------
def result_log_path(exp_dir: Path) -> Path:
    return exp_dir.parent / f".{exp_dir.name}.results.jsonl"


def append_result(exp_dir: Path, folder: str, result: dict) -> None:
    """Append one trial result to the stage's record (one ``write`` to an append-only file, done before
    Tune moves on: a driver killed at any moment leaves every earlier line whole). Tune's own
    ``result.json`` in the run directory is a copy it rewrites in the background, which a kill can cut
    short; :func:`load_trials` falls back to this record then."""
    path = result_log_path(Path(exp_dir))
    if not path.exists():
        manifest.register(path.parent, path.name)
    line = json.dumps({**result, _FOLDER: folder}, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_result_log(exp_dir: Path) -> dict[str, list[dict]]:
    """trial folder -> its results in the stage's record, from its latest start (a trial Tune ran again
    from the beginning, after a killed driver, starts over at ``training_iteration`` 1)."""
    found: dict[str, list[dict]] = {}
    for result in read_results(result_log_path(Path(exp_dir))):
        folder = result.pop(_FOLDER, None)
        if not isinstance(folder, str) or (FIDELITY not in result and METRIC not in result):
            continue
        if result.get("training_iteration") == 1:
            found[folder] = []
        found.setdefault(folder, []).append(result)
    return found


_FOLDER = "pctune_trial_folder"


def read_results(path: Path) -> list[dict]:
    """The complete lines of a ``result.json`` (a driver killed while appending cuts one short)."""
    if not path.is_file():
        return []
    results = []
    for line in path.read_text().splitlines():
        try:
            results.append(json.loads(line))
        except ValueError:
            continue
    return results


def last_result(path: Path) -> dict | None:
    """The last complete line of a ``result.json``."""
    return next(reversed(read_results(path)), None)


def early_stops_path(exp_dir: Path) -> Path:
    return exp_dir.parent / f".{exp_dir.name}.early-stops.json"


def read_early_stops(exp_dir: Path) -> dict[str, int]:
    """trial id -> images seen, for the trials of ``exp_dir`` a scheduler stopped early."""
    path = early_stops_path(Path(exp_dir))
    try:
        return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def record_early_stop(exp_dir: Path, trial_id: str, images: int) -> None:
    """Note that the scheduler stopped ``trial_id`` after ``images`` images (written before Tune acts on
    it, so a resumed search knows the trial is done)."""
    stops = read_early_stops(exp_dir)
    stops[trial_id] = images
    path = early_stops_path(Path(exp_dir))
    manifest.register(path.parent, path.name)
    atomic_write_json(path, stops)
