"""Weights named by MLflow: ``models:/<name>@<alias>``, ``models:/<name>/<version>`` and
``runs:/<run_id>/<path>`` (:func:`pctune.models.weights.is_weights_uri` tells them from paths), resolved
to the version and run they name now and fetched into a local cache.

A resolution is pinned: :class:`ResolvedWeights.pinned` names the same files however the registry's aliases
move later (a model version, or the run's own artifact path), so a run directory that records it can
fetch the very weights it was searched with again. Plain values in, plain values out: the callers decide
what a URI means to a job (:mod:`pctune.lineage`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pctune.errors import PctuneError
from pctune.utils import first_line

_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))")
_RUN_URI = re.compile(r"runs:/(?P<run_id>[^/]+)/(?P<path>.+)")


@dataclass(frozen=True)
class ResolvedWeights:
    """What a weights URI named when it was resolved: ``pinned`` names the same files for good."""

    uri: str
    pinned: str
    run_id: str
    model: str | None = None
    version: str | None = None

    def lineage(self) -> dict[str, str | None]:
        return asdict(self)

    def describe(self) -> str:
        what = f"version {self.version} of {self.model}" if self.model else "its artifact"
        return f"{self.uri} -> {what} (run {self.run_id})"


def resolve_weights_uri(uri: str, tracking_uri: str) -> ResolvedWeights:
    """The model version or run ``uri`` names now; a one-line :class:`PctuneError` for a name, alias,
    version or run the tracking store does not hold."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    model, run = _MODEL_URI.fullmatch(uri), _RUN_URI.fullmatch(uri)
    try:
        if model:
            name, alias, version = model["name"], model["alias"], model["version"]
            found = (client.get_model_version_by_alias(name, alias) if alias
                     else _latest(client, name) if version == "latest" else client.get_model_version(name, version))
            return ResolvedWeights(uri, f"models:/{name}/{found.version}", found.run_id or "", name, str(found.version))
        if run:
            client.get_run(run["run_id"])
            return ResolvedWeights(uri, uri, run["run_id"])
    except MlflowException as exc:
        raise PctuneError(f"{uri}: not found in the MLflow tracking store {tracking_uri} "
                          f"({first_line(exc)[:200]})") from None
    raise PctuneError(f"{uri}: not a weights URI (models:/<name>@<alias>, models:/<name>/<version> or "
                      "runs:/<run_id>/<path>)")


def _latest(client, name: str):
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        from mlflow.exceptions import MlflowException

        raise MlflowException(f"Registered model {name} has no versions")
    return max(versions, key=lambda v: int(v.version))


def _storage_uri(resolved: ResolvedWeights, tracking_uri: str) -> str:
    """Where the files of ``resolved.pinned`` are stored. MLflow's own ``models:/`` download asks the
    process-wide registry (``mlflow.get_registry_uri()``, which follows an earlier ``set_tracking_uri``)
    for the version, so the version is looked up here, by a client of ``tracking_uri`` (whose registry is
    ``$MLFLOW_REGISTRY_URI`` if set, else that store), and its storage downloaded."""
    if not resolved.model:
        return resolved.pinned
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    return client.get_model_version_download_uri(resolved.model, resolved.version)


def fetch_weights(resolved: ResolvedWeights, tracking_uri: str, cache: str | Path) -> Path:
    """The local copy of ``resolved.pinned`` under ``cache`` (downloaded once, into a temporary folder
    renamed into place, so an interrupted download is never taken for a copy): its one file, or the
    folder when it holds several (Predify's per-pcoder files)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    key = hashlib.blake2b(f"{tracking_uri}\n{resolved.pinned}\n{resolved.run_id}".encode(), digest_size=8).hexdigest()
    folder = Path(cache) / "mlflow-weights" / key
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=_storage_uri(resolved, tracking_uri),
                                                dst_path=str(staging), tracking_uri=tracking_uri)
            staging.rename(folder)
        except MlflowException as exc:
            reason = first_line(exc)[:200]
            raise PctuneError(f"{resolved.uri}: could not download {resolved.pinned} ({reason})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise PctuneError(f"{resolved.uri}: {resolved.pinned} holds no files")
    return files[0] if len(files) == 1 else folder


def fetch_named_weights(uri: str, tracking_uri: str, cache: str | Path,
                        resolved: ResolvedWeights | None = None) -> tuple[ResolvedWeights, Path]:
    """What ``uri`` names now (or the ``resolved`` a run recorded earlier) and its local copy."""
    resolved = resolved or resolve_weights_uri(uri, tracking_uri)
    return resolved, fetch_weights(resolved, tracking_uri, cache)
