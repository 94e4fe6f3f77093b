"""Reading a Ray Tune experiment folder without Ray: its trials (``params.json``, ``result.json``), their
results and the record of the trials a scheduler stopped early. The run directory
(:mod:`pctune.search.rundir`) reads its stages through these."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pctune.search import manifest
from pctune.search.objective import METRIC
from pctune.utils import atomic_write_json

_TRIAL_DIR = re.compile(r"^[A-Za-z0-9_]*?_[0-9a-f]{8}_(\d+)_")


@dataclass(frozen=True)
class Trial:
    """One trial of a Tune experiment; ``status`` is TERMINATED (its final result reported, or stopped
    early by the scheduler), ERROR or PENDING (not started, or still running: a partial result only).
    ``curve``: (images seen, running mean_ce) at each of its reports."""

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


def load_trials(exp_dir: str | Path) -> list[Trial]:
    """Every trial of one Tune experiment folder, in creation order."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        return []
    stopped = read_early_stops(exp_dir)
    trials = [_read_trial(folder, stopped) for folder in exp_dir.iterdir()
              if folder.is_dir() and (folder / "params.json").is_file()]
    return sorted((t for t in trials if t is not None), key=lambda t: (t.index, t.folder))


def _read_trial(folder: Path, stopped: dict[str, int]) -> Trial | None:
    try:
        config = json.loads((folder / "params.json").read_text())
    except ValueError:  # a params.json the killed driver left empty: the trial never started
        return None
    results = [r for r in read_results(folder / "result.json") if METRIC in r]
    metrics = results[-1] if results else {}
    trial_id = metrics.get("trial_id", folder.name)
    early = bool(metrics) and not is_final(metrics) and trial_id in stopped
    if metrics and (is_final(metrics) or early):
        status = "TERMINATED"
    else:
        status = "ERROR" if any(folder.glob("error.*")) else "PENDING"
    match = _TRIAL_DIR.search(folder.name)
    curve = tuple((int(r.get("num_images", 0)), float(r[METRIC])) for r in results)
    return Trial(trial_id=trial_id, folder=folder.name, index=int(match.group(1)) if match else -1, status=status,
                 config=config, metrics=metrics, curve=curve, stopped_early=early)


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
