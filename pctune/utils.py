"""Small helpers shared across pctune: the log function type, atomic file writes, saving figures,
batching, short error text.

Depends on nothing else in pctune, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: what pctune reports progress through: one line of text per call (``log=`` parameters)
Log = Callable[[str], None]


def print_line(message: str) -> None:
    """The default :data:`Log`: print ``message`` to stdout at once (flushed: lines show while a long
    search runs, also through a pipe). A module-level function, so that the Ray Tune callbacks and
    schedulers holding it can be pickled into the experiment state and restored on ``--resume``."""
    print(message, flush=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename: a reader (or a driver
    killed mid-write) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException as exc:  # a full disk, or a signal mid-write: no temporary file stays behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc  # the file meant (ENOSPC names none)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """JSON (values it cannot encode are written as their ``str``), atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary sibling and a rename."""
    import io

    import torch

    buffer = io.BytesIO()  # serialized first: a full disk is then a plain OSError of the write
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Lay out, save and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display on workers or CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """``items`` in consecutive slices of at most ``size`` (one empty slice for no items)."""
    for start in range(0, max(len(items), 1), size):
        yield items[start:start + size]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
