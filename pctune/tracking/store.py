"""Where tracking goes: an explicit URI, ``MLFLOW_TRACKING_URI``, or a local SQLite store."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from pctune.errors import PctuneError

LOCAL_DB = "mlflow.db"


def resolve_tracking_uri(explicit: str | None = None, directory: str | Path | None = None) -> str:
    """The flag or job's URI, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<dir>/mlflow.db``."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(directory or Path.cwd()).resolve() / LOCAL_DB
    return f"sqlite:///{path}"


def ui_command(uri: str) -> str:
    """The line a user runs (or opens) to browse ``uri``."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail with one line, before any trial starts, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status != 200:
                raise PctuneError(f"MLflow tracking server {uri} answered {response.status} on /health")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PctuneError(f"MLflow tracking server {uri} is unreachable ({reason})") from exc
