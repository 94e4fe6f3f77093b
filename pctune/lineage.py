"""A job's feedback weights named by MLflow (``models:/...``, ``runs:/...``), made a local file before
anything builds the model, with the lineage the run directory and the search's parent run record.

One rule for every command that reads a job: a new search resolves the URI as it stands now; a run
directory that recorded a resolution keeps it (``--resume``, ``sync``, ``promote``, ``check`` of a
resume), so moving an alias never changes the weights under a search that already started. The
search's identity (:mod:`pctune.search.identity`) holds the pinned URI and the weights' digest.
"""

from __future__ import annotations

from dataclasses import replace

from pctune.errors import PctuneError
from pctune.models.weights import is_weights_uri
from pctune.search.identity import LINEAGE_KEY
from pctune.search.job import Job
from pctune.search.rundir import RunDir
from pctune.tracking.store import check_reachable
from pctune.tracking.weights import ResolvedWeights, fetch_named_weights, resolve_weights_uri
from pctune.utils import Log


def with_local_weights(job: Job, tracking_uri: str, log: Log, *, new_search: bool) -> Job:
    """``job`` with ``model.feedback_weights`` a local file when it names MLflow weights (else ``job``
    itself); ``new_search``: a search that starts anew (not ``--resume``), which resolves the URI afresh."""
    source = job.model.feedback_weights
    if isinstance(source, list) and any(is_weights_uri(s) for s in source):
        raise PctuneError(f"{job.source}: model.feedback_weights: an MLflow URI names all of a model's feedback "
                          "weights: give it as one string, not in a list")
    if not is_weights_uri(source):
        return job
    check_reachable(tracking_uri)  # seconds, not MLflow's minutes of retries, for a server that is down
    recorded = None if new_search else _recorded(job)
    from pctune.data.demo import cache_root

    try:
        resolved, local = fetch_named_weights(source, tracking_uri, cache_root(),
                                              _kept(recorded, source, tracking_uri, log) if recorded else None)
    except PctuneError as exc:
        raise PctuneError(f"{job.source}: model.feedback_weights: {exc}") from None
    log(f"feedback weights: {resolved.describe()}")
    return replace(job, model=replace(job.model, feedback_weights=str(local)), weights_lineage=resolved.lineage())


def _recorded(job: Job) -> ResolvedWeights | None:
    """The resolution job.json records for this URI (none for a new run directory, or a damaged job.json,
    which the search's own checks report)."""
    try:
        lineage = RunDir(job.run_dir).job_record().get(LINEAGE_KEY)
    except (PctuneError, ValueError, OSError):
        return None
    if not isinstance(lineage, dict) or lineage.get("uri") != job.model.feedback_weights:
        return None
    try:
        return ResolvedWeights(**lineage)
    except TypeError:
        return None


def _kept(recorded: ResolvedWeights, uri: str, tracking_uri: str, log: Log) -> ResolvedWeights:
    """The recorded resolution, with a note when the URI names other weights now."""
    try:
        now = resolve_weights_uri(uri, tracking_uri)
    except PctuneError:
        return recorded  # (an alias removed since: the pinned version is what counts)
    if now.pinned != recorded.pinned:
        log(f"note: {uri} names {now.pinned} now; this run directory keeps {recorded.pinned}, which its search "
            "started with (--overwrite starts the search over with the weights the URI names now)")
    return recorded
