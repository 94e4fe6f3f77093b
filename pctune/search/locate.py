"""Finding jobs and search spaces by name or path.

pctune ships its jobs and search spaces as package data (``pctune/jobs/*.toml``,
``pctune/search_spaces/*.toml``; a checkout links ``jobs/`` and ``search_spaces/`` to them), so
``pctune search demo`` works from any directory, in a checkout or an installed wheel alike:

- a job given as a path (a ``.toml`` suffix or a path separator) is that file;
- a job given by name is ``./jobs/NAME.toml`` in the current directory, else pctune's own;
- a search space given by name is ``search_spaces/NAME.toml`` next to the job's folder, in the current
  directory, or pctune's own; given as a path, it is relative to the job file or the current directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from pctune.errors import PctuneError

#: the directory above the ``pctune`` package: the checkout (tests and scripts); never used to find files
REPO_ROOT = Path(__file__).resolve().parents[2]


def shipped(folder: str) -> Path:
    """A folder of pctune's package data: ``jobs`` or ``search_spaces``."""
    return Path(str(resources.files("pctune").joinpath(folder)))


def is_path(name_or_path: str | Path) -> bool:
    """Whether a job or space is given as a path (a ``.toml`` suffix or a path separator), not a name."""
    path = Path(name_or_path)
    return path.suffix == ".toml" or len(path.parts) > 1


def resolve_job_path(name_or_path: str | Path) -> Path:
    """A job given as a path, or by name in ``./jobs`` or pctune's own jobs."""
    if is_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise PctuneError(f"{path}: no such job file")
        return path
    name = str(name_or_path)
    local, own = Path("jobs"), shipped("jobs")
    for folder in (local, own):
        if (folder / f"{name}.toml").is_file():
            return folder / f"{name}.toml"
    groups = []
    if local.is_dir() and local.resolve() != own.resolve():
        groups.append((_names(local), "in ./jobs"))
    groups.append((_names(own), "shipped with pctune"))
    known = "; ".join(f"{', '.join(names)} ({where})" for names, where in groups if names)
    raise PctuneError(f"unknown job {name!r}; known jobs: {known or 'none'}")


def resolve_space_path(space: str, job_file: Path) -> Path:
    """A search space given as a path (relative to the job file or the current directory) or by
    name in ``search_spaces/`` (next to the job's folder, in the current directory, or pctune's own)."""
    path = Path(space)
    if is_path(space):
        for candidate in (job_file.parent / path, path):
            if candidate.is_file():
                return candidate
        raise PctuneError(f"{job_file}: search.space: no such file {space!r}")
    folders = list(dict.fromkeys([job_file.parent.parent / "search_spaces", Path("search_spaces"),
                                  shipped("search_spaces")]))
    for folder in folders:
        if (folder / f"{space}.toml").is_file():
            return folder / f"{space}.toml"
    raise PctuneError(f"{job_file}: search.space: unknown search space {space!r} (looked in "
                      f"{', '.join(str(f) for f in folders)})")


def _names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []
