"""Claiming a search's run directory: where it may be, who holds it, and what ``--overwrite`` removes.

A search holds the run directory's lock (:mod:`pctune.search.runlock`) from its first check to its end,
refuses early (before preparing the model and data) what it would refuse anyway, and claims the folder
(removing an earlier run for ``--overwrite``, writing the manifest) only after every check passed, so a
refused search removes nothing and leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from pctune.errors import PctuneError
from pctune.search import manifest
from pctune.search.job import Job
from pctune.search.manifest import MARKER
from pctune.search.rundir import RunDir
from pctune.search.runlock import run_lock
from pctune.utils import Log, print_line


def search_lock(job: Job, log: Log = print_line) -> contextlib.AbstractContextManager:
    """The lock of the job's run directory (:mod:`pctune.search.runlock`), held by a search from its
    checks to its end (re-entrant: the pipeline holds it across the search, sync and promotion)."""
    check_location(job)
    return run_lock(job.run_dir, f"pctune search {job.name}", log)


def check_location(job: Job) -> None:
    """The run directory is a folder (or does not exist yet) directly inside the storage path."""
    path = job.run_dir
    storage = Path(job.run.storage_path).expanduser().resolve()
    if storage.exists() and not storage.is_dir():
        raise PctuneError(f"run.storage_path: {storage} is a file, not a folder")
    if path.parent != storage:
        raise PctuneError(f"{job.source}: name: {job.name!r} would put the run directory at {path}, outside the "
                          f"storage path {storage}")
    if path.exists() and not path.is_dir():
        raise PctuneError(f"{path} is a file, not a run directory: move it away or choose another --storage-path")


def claim_plan(job: Job, run_dir: RunDir) -> list[str]:
    """What claiming ``run_dir`` removes: nothing for a new or resumed search, the earlier run's
    entries (:func:`pctune.search.manifest.overwrite_entries`) for ``--overwrite``; a PctuneError, with
    nothing removed, when the folder holds a search and neither is asked for, or holds files pctune did
    not write."""
    if manifest.is_empty(run_dir.path) or job.resume:
        return []
    if job.run.if_exists != "overwrite":
        raise PctuneError(f"{run_dir.path} already holds a search of {job.name}: pass --resume to continue it or "
                          "--overwrite to start over")
    return manifest.overwrite_entries(run_dir.path)


def claim_run_dir(job: Job, run_dir: RunDir, log: Log) -> None:
    """Make ``run_dir`` this search's: new, resumed, or (``--overwrite``) an earlier pctune run of the
    job replaced. Nothing that pctune did not create is ever removed. The caller holds the lock."""
    check_location(job)
    path = run_dir.path
    if manifest.is_empty(path):
        if job.resume:
            log(f"nothing to resume in {path}: starting a new search")
    elif job.resume:
        log(f"resuming the search in {path}")
    removed = claim_plan(job, run_dir)
    if removed:
        for name in removed:
            target = path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        (path / MARKER).unlink(missing_ok=True)  # a fresh manifest below
        shown = [n for n in removed if not n.startswith(".")]
        log(f"replaced the earlier search in {path} (removed: {', '.join(shown) or 'nothing'})")
    run_dir.mark()
