"""Stopping a long command cleanly: SIGTERM (what ``timeout``, ``kill``, ``ray job stop``, Kubernetes and
systemd send, to the driver or to its whole process group) is handled like Ctrl-C. Ray Tune stops its
trials and saves its state on SIGINT; the search then writes its partial results and the resume hint,
and the command exits 143 (130 for Ctrl-C). A local Ray runs in a session of its own
(:mod:`pctune.localray`), so a signal to the group does not kill it under the search.

``ray.init`` installs its own SIGTERM handler in the driver (it aborts the process), so the handler is
put back after Ray starts (:func:`after_ray_init`). Library use (no :func:`enable`) is left alone.

A loop with safe stopping points (an epoch's batches) runs under :func:`deferred`: a signal is only
recorded there and the loop calls :func:`check` between steps. An exception raised straight from a
signal handler can land where Python drops it (a fork hook of a starting DataLoader worker: "Exception
ignored in ...") and the stop would be lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

_enabled = False
_received: int | None = None
_requested = False  # a stop was asked for (SIGINT or SIGTERM), since enable()
_deferred = False
_owner = 0  # the pid of the command that enabled the handlers (forked children inherit them)


def enable() -> None:
    """Handle SIGTERM like SIGINT from now on (the ``pctune`` command calls this)."""
    global _enabled, _received, _requested, _owner
    _enabled, _received, _requested = True, None, False  # a new command (tests run several in one process)
    _owner = os.getpid()
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)


def after_ray_init() -> None:
    """Take SIGTERM back from Ray's handler, if :func:`enable` was called."""
    if _enabled:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    global _received, _requested
    if os.getpid() != _owner:  # a forked child (a DataLoader worker): its parent stops it
        return
    _received, _requested = signal.SIGTERM, True
    if not _deferred:
        os.kill(os.getpid(), signal.SIGINT)  # Ray Tune's own handler, or KeyboardInterrupt, takes it from here


def _on_sigint(signum, frame) -> None:
    global _requested
    if os.getpid() != _owner:  # a forked child: a KeyboardInterrupt in its fork hooks would print a traceback
        return
    _requested = True
    if not _deferred:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM are only recorded: the code calls :func:`check` at its safe points."""
    global _deferred
    before, _deferred = _deferred, _enabled
    try:
        yield
    finally:
        _deferred = before


def check() -> None:
    """KeyboardInterrupt if a stop was asked for (see :func:`deferred`)."""
    if _requested:
        raise KeyboardInterrupt


def requested() -> bool:
    """Whether a stop (SIGINT, SIGTERM) was asked for since :func:`enable` (Ray Tune's own handler may
    have taken the signal itself, so the code asks here rather than waiting for a KeyboardInterrupt)."""
    return _requested


def exit_code() -> int:
    """143 after SIGTERM, 130 after SIGINT (128 + the signal's number)."""
    return 128 + (_received or signal.SIGINT)


def signal_name() -> str:
    return "SIGTERM" if _received == signal.SIGTERM else "SIGINT"
