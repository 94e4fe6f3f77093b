"""Where tracking goes: an explicit URI, ``MLFLOW_TRACKING_URI``, or a local SQLite store."""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from pctune.errors import PctuneError
from pctune.utils import first_line

LOCAL_DB = "mlflow.db"


def resolve_tracking_uri(explicit: str | None = None, directory: str | Path | None = None) -> str:
    """The flag or job's URI, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<dir>/mlflow.db``."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(directory or Path.cwd()).resolve() / LOCAL_DB
    return f"sqlite:///{path}"


def ui_command(uri: str, experiment_id: str | None = None) -> str:
    """The line a user runs (or opens) to browse ``uri``: with an experiment, the URL of its runs view
    (MLflow 3's UI opens an experiment on its GenAI overview otherwise)."""
    view = f"/#/experiments/{experiment_id}/runs" if experiment_id else ""
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}{view} in a browser"
    return f"mlflow ui --backend-store-uri {uri}" + (f", then open http://127.0.0.1:5000{view}" if view else "")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail with one line, before any trial starts, when the tracking store cannot take the search: a
    server that does not answer, a local store in a folder this process cannot write, or a URI that
    MLflow does not know."""
    if uri.startswith(("http://", "https://")):
        _check_server(uri, timeout)
    elif uri.startswith("sqlite:///"):
        _check_writable(Path(uri[len("sqlite:///"):]), uri)
    elif uri.startswith("file://") or "://" not in uri:
        _check_writable(Path(uri[len("file://"):] if uri.startswith("file://") else uri) / "probe", uri)
    else:
        _check_scheme(uri)


def _check_server(uri: str, timeout: float) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status != 200:
                raise PctuneError(f"MLflow tracking server {uri} answered {response.status} on /health")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PctuneError(f"MLflow tracking server {uri} is unreachable ({reason})") from exc


def _check_writable(path: Path, uri: str) -> None:
    """The store's file (or a file in its folder) can be created and written: create and delete a probe."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".pctune-probe-"):
            pass
    except OSError as exc:
        raise PctuneError(f"MLflow tracking store {uri} is not writable ({first_line(exc)})") from exc


def _check_scheme(uri: str) -> None:
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri=uri)
    except Exception as exc:  # MLflow's own exception types
        reason = first_line(exc).split(". ")[0].rstrip(".")
        raise PctuneError(f"MLflow cannot use the tracking URI {uri!r} ({reason})") from exc
