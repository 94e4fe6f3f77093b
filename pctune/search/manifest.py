"""What pctune wrote into a run directory: the manifest, and the rule ``--overwrite`` follows.

The marker ``.pctune-run`` that pctune writes into every run directory it creates is the manifest: a
JSON object whose ``entries`` list the top-level files and folders pctune created there. Every writer
of a run directory registers what it writes with :func:`register` (``RunDir.write_json`` and
``write_text`` do it for every file they write; the Tune stage folders, Tune-state snapshots, early-stop
records, ``summary/``, ``promotion/``, the leaderboard and the sweep files register themselves).

``--overwrite`` (:func:`overwrite_entries`) removes exactly the manifest's entries, and refuses,
removing nothing, when the folder holds anything else: a top-level file or folder that is not listed,
or a file one level down in a folder pctune made that is not of the kind pctune or Ray Tune writes
there (``joint/notes.md``; deeper levels, inside Tune's trial folders, are Tune's). A run directory
of an older pctune (a marker without a manifest, or no marker and a ``job.json``) is judged by the
names pctune's files have (:data:`KNOWN`) instead of a manifest.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from pctune.errors import PctuneError
from pctune.utils import atomic_write_json

MARKER = ".pctune-run"  # the manifest; written when pctune creates a run directory
FORMAT = "pctune-run-manifest-v1"
LOCK = ".pctune-lock"  # :mod:`pctune.search.runlock`: never an entry, never removed by --overwrite
_NOTE = "created by pctune: `--overwrite` removes exactly the entries listed here, and refuses if the folder holds more"

#: The top-level names an older pctune's run directory holds (the rule for run directories without a
#: manifest): its files, its Tune stage folders and their hidden state files.
KNOWN = re.compile(r"^(job\.json|references\.json|combination\.json|tracking\.json|leaderboard\.csv|best\.toml"
                   r"|sweep\.csv|sweep\.png|promotion|summary|joint|pcoder\d+|(joint|pcoder\d+)\.damaged-[\d-]+"
                   r"|\.(joint|pcoder\d+)\.(tune-state\.(pkl|json)|early-stops\.json))$")
_TMP = re.compile(r"^(?P<name>.+)\.\d+\.tmp$")  # what an atomic write killed halfway leaves
_STAGE = re.compile(r"^(joint|pcoder\d+)(\.damaged-[\d-]+)?$")
#: One level inside the folders pctune makes: what pctune or Ray Tune writes there.
_INSIDE = {
    "stage": re.compile(r"^(experiment_state-.*\.json|searcher-state-.*\.pkl|search_gen_state-.*\.json"
                        r"|basic-variant-state-.*\.json|tuner\.pkl|trainable\.pkl|\.validate_storage_marker"
                        r"|.*_[0-9a-f]{5,}_\d+_.*|.*\.tmp)$"),
    "summary": re.compile(r"^(leaderboard\.csv|score_over_trials\.png|accuracy_per_timestep\.png"
                          r"|param_importances\.png|tradeoff\.csv|tradeoff\.png|.*\.tmp)$"),
    "promotion": re.compile(r"^rank\d+$"),
}
_write = threading.Lock()


def read_manifest(run_dir: Path) -> set[str] | None:
    """The entries of ``run_dir``'s manifest; None without one (no marker, or an older pctune's)."""
    try:
        data = json.loads((Path(run_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return {str(name) for name in data.get("entries", [])}


def write_manifest(run_dir: Path, entries: set[str]) -> None:
    atomic_write_json(Path(run_dir) / MARKER, {"format": FORMAT, "note": _NOTE, "entries": sorted(entries)})


def register(run_dir: Path, name: str) -> None:
    """Record that pctune created the top-level entry ``name`` (a file or folder, or the first part of
    a relative path) of ``run_dir``. A no-op where there is no manifest (an older pctune's run)."""
    top = Path(name).parts[0]
    if top in (MARKER, LOCK):
        return
    with _write:
        entries = read_manifest(run_dir)
        if entries is not None and top not in entries:
            write_manifest(run_dir, entries | {top})


def mark(run_dir: Path) -> None:
    """Make ``run_dir`` a pctune run directory with a manifest (creating it). An older pctune's run
    (being resumed) gets a manifest of the entries named like pctune's (:data:`KNOWN`)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _write:
        if read_manifest(run_dir) is None:
            write_manifest(run_dir, {n for n in _names(run_dir) if KNOWN.match(n)})


def _names(run_dir: Path) -> list[str]:
    """The top-level entries, the marker, the lock and a lock being taken over aside."""
    return sorted(p.name for p in run_dir.iterdir() if p.name != MARKER and not p.name.startswith(LOCK))


def is_empty(run_dir: Path) -> bool:
    """Nothing in it but (possibly) the marker and the lock."""
    return not Path(run_dir).is_dir() or not _names(run_dir)


def is_pctune_run(run_dir: Path) -> bool:
    """Marked by pctune, or (a run of an older pctune, before the marker) holding a ``job.json`` and
    nothing but the files and folders a search writes."""
    names = _names(run_dir)
    if (Path(run_dir) / MARKER).is_file():
        return True
    return "job.json" in names and all(_own(n, None) for n in names)


def _own(name: str, entries: set[str] | None) -> bool:
    """Whether the top-level ``name`` is pctune's: in ``entries`` (a manifest), else named like pctune's
    (:data:`KNOWN`); an atomic write's leftover counts as the file it was writing."""
    tmp = _TMP.match(name)
    base = tmp.group("name") if tmp else name
    return bool(KNOWN.match(base)) if entries is None else base in entries


def overwrite_entries(run_dir: Path) -> list[str]:
    """The top-level entries ``--overwrite`` removes from ``run_dir`` (the manifest's, or an older
    run's by :data:`KNOWN`); a one-line PctuneError, before anything is removed, if the folder holds
    anything pctune did not write."""
    run_dir = Path(run_dir)
    if not is_pctune_run(run_dir):
        raise PctuneError(f"{run_dir} is not a pctune run directory (no {MARKER}, and it holds other files): "
                          "not removing it; move it away or choose another --storage-path")
    entries = read_manifest(run_dir)
    names = _names(run_dir)
    own = [n for n in names if _own(n, entries)]
    foreign = [n for n in names if n not in own]
    foreign += [f"{n}/{inner}" for n in own for inner in _foreign_inside(run_dir, n)]
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise PctuneError(f"{run_dir} holds files pctune did not write ({shown}): --overwrite removed nothing; "
                          "move them out of the folder (or choose another --storage-path) and run it again")
    return own


def _foreign_inside(run_dir: Path, name: str) -> list[str]:
    """The entries one level inside pctune's folder ``name`` that pctune or Ray Tune does not write."""
    folder = run_dir / name
    kind = "stage" if _STAGE.match(name) else name
    if kind not in _INSIDE or not folder.is_dir() or folder.is_symlink():
        return []
    return sorted(p.name for p in folder.iterdir() if not _INSIDE[kind].match(p.name))
