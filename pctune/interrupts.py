"""Stopping a long command cleanly: SIGTERM (what ``timeout``, ``kill`` and ``ray job stop`` send) is
handled like Ctrl-C. Ray Tune stops its trials and saves its state on SIGINT; the search then writes
its partial results and the resume hint, and the command exits 143 (130 for Ctrl-C).

``ray.init`` installs its own SIGTERM handler in the driver (it aborts the process), so the handler is
put back after Ray starts (:func:`after_ray_init`). Library use (no :func:`enable`) is left alone.
"""

from __future__ import annotations

import os
import signal

_enabled = False
_received: int | None = None


def enable() -> None:
    """Handle SIGTERM like SIGINT from now on (the ``pctune`` command calls this)."""
    global _enabled
    _enabled = True
    signal.signal(signal.SIGTERM, _on_sigterm)


def after_ray_init() -> None:
    """Take SIGTERM back from Ray's handler, if :func:`enable` was called."""
    if _enabled:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    global _received
    _received = signal.SIGTERM
    os.kill(os.getpid(), signal.SIGINT)  # Ray Tune's own handler, or KeyboardInterrupt, takes it from here


def exit_code() -> int:
    """143 after SIGTERM, 130 after SIGINT (128 + the signal's number)."""
    return 128 + (_received or signal.SIGINT)


def signal_name() -> str:
    return "SIGTERM" if _received == signal.SIGTERM else "SIGINT"
