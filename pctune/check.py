"""``pctune check JOB``: everything a search checks before its first trial, without running one.

The checks are the search's own functions, called in the search's order, so that ``check`` and
``search`` cannot disagree: the job and its flags (loaded by the caller), the files it names, the run
directory (storage path, an earlier search, its lock and, with ``--resume``, its identity), the model
with its weights, the search space and starting points, the data with its labels (and masks), the
key that signs the resume state, the tracking store and the resources a trial asks for. Nothing is
written: not the run directory, not the storage path, not the tracking store (it is probed with a
temporary file, as the search does); only the signing key is created on first use, as a search would.

A cluster given by ``run.address`` / ``$RAY_ADDRESS`` is not joined (joining takes Ray's connection
time-out when the address is wrong): its resources are checked by the search when it connects.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pctune.errors import PctuneError
from pctune.lineage import with_local_weights
from pctune.search.claim import check_location, claim_plan
from pctune.search.identity import check_resume, digest_arrays, evaluation_arrays, fingerprint
from pctune.search.job import Job
from pctune.search.prepare import check_paths, prepare
from pctune.search.raycluster import check_resources, cluster_address, local_resources
from pctune.search.rundir import RunDir
from pctune.search.runlock import check_free
from pctune.search.signing import state_key
from pctune.tracking.store import check_reachable, resolve_tracking_uri
from pctune.utils import Log, first_line, print_line


def check(job: Job, log: Log = print_line) -> dict[str, Any]:
    """Run every check of a search of ``job`` up to its first trial; a problem is a :class:`PctuneError`.
    Returns what was found (for the summary line and for tests)."""
    uri = resolve_tracking_uri(job.tracking.tracking_uri)
    job = with_local_weights(job, uri, lambda _message: None, new_search=not job.resume)
    check_paths(job)
    run = check_run_directory(job)
    state_key()  # the key that will sign the search's Tune state (pctune.search.signing)
    prep = prepare(job, log=lambda _message: None)
    if run == "resume":  # the same job, or the search would refuse
        check_resume(RunDir(job.run_dir), prep, fingerprint(prep, digest_arrays(evaluation_arrays(prep))))
    check_reachable(uri)
    cluster = check_local_resources(job)
    found = {"job": job.name, "model": prep.spec.name, "pcoders": prep.net.num_pcoders,
             "images": len(prep.labels), "dimensions": len(prep.space.dimensions()), "run_directory": run,
             "tracking_uri": uri, "cluster": cluster}
    log(f"check: {job.name} is ready to search: model {prep.spec.name} ({prep.net.num_pcoders} pcoders), "
        f"{len(prep.labels)} images, a {found['dimensions']}-dimensional space, {_plan(job)}; "
        f"run directory {job.run_dir} ({run}); tracking {uri}; {cluster}")
    return found


def _plan(job: Job) -> str:
    search = job.search
    return f"{search.strategy} with {search.sampler} ({search.num_samples} trials, scheduler {search.scheduler})"


# -- the run directory --------------------------------------------------------------------------------
def check_run_directory(job: Job) -> str:
    """What a search would do with its run directory ("new", "resume", "overwrite"), with the
    search's own refusals (the location, an earlier search, files pctune did not write, another
    command holding its lock); the storage path must be a folder this process can write (probed)."""
    run_dir = RunDir(job.run_dir)
    check_location(job)
    check_free(run_dir.path)
    removed = claim_plan(job, run_dir)
    _check_writable(Path(job.run.storage_path).expanduser().resolve(), "run.storage_path")
    if removed:
        return f"overwrite: would remove {', '.join(n for n in removed if not n.startswith('.'))}"
    return "resume" if job.resume and run_dir.has_search() else "new"


def _check_writable(path: Path, field: str) -> None:
    """``path`` (or, when it does not exist yet, the nearest folder above it, where it would be
    created) takes a new file: created and removed at once."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".pctune-check-"):
            pass
    except OSError as exc:
        raise PctuneError(f"{field}: {path}: cannot write there ({first_line(exc)})") from exc


# -- resources ----------------------------------------------------------------------------------------
def check_local_resources(job: Job) -> str:
    """A trial's CPUs and GPUs against this machine's, when the search would start a local Ray (the
    search's own check, :func:`pctune.search.raycluster.check_resources`, before Ray starts)."""
    check_resources(job, log=lambda _message: None)  # a cluster not joined yet: nothing to compare
    address = cluster_address(job)
    if address:
        return f"cluster {address} (resources checked when the search joins it)"
    have = local_resources()
    return f"local Ray ({have['CPU']:g} CPUs, {have['GPU']:g} GPUs)"
