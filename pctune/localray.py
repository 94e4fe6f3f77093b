"""The local Ray that pctune starts, kept out of the driver's process group.

``timeout``, Kubernetes stopping a pod and systemd send SIGTERM to a whole process group. Ray starts
its local processes (GCS, raylet, agents; the raylet then starts the workers) as plain children of the
driver, in the driver's group, so that signal killed Ray under the search: the driver hung for a minute
on the lost GCS and died with Ray's native error, having saved nothing. Here every process
``ray.init`` starts runs in a session of its own: a signal to the group reaches the driver alone,
which stops the trials (or shards) through Ray, saves what finished, and then shuts Ray down itself
(:func:`shutdown`). Ray still ties those processes to the driver with the kernel's parent-death
signal, so a driver killed outright (SIGKILL) leaves no orphans either.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from pctune import interrupts

_started_here = False


def init_local(**kwargs) -> None:
    """``ray.init(address="local", ...)`` with Ray's processes in their own session."""
    import ray

    global _started_here
    with _own_session(), quiet_logging():
        ray.init(address="local", logging_level=logging.ERROR, **kwargs)
    _started_here = True
    interrupts.after_ray_init()


def init(address: str | None, **kwargs) -> None:
    """Join the Ray at ``address`` (the caller's connect options apply) or, with no address, start a
    local Ray (:func:`init_local`)."""
    import ray

    if address:
        with quiet_logging():
            ray.init(address=address, logging_level=logging.ERROR, **kwargs)
        interrupts.after_ray_init()
    else:
        init_local(**kwargs)


def shutdown() -> None:
    """Stop the Ray that :func:`init_local` started (its processes, workers included); a Ray joined at
    an address, or started by someone else, is left alone."""
    global _started_here
    if not _started_here:
        return
    import ray

    _started_here = False
    with contextlib.suppress(Exception):
        ray.shutdown()


@contextlib.contextmanager
def quiet_logging() -> Iterator[None]:
    """Ray's driver-side INFO and WARNING lines (a local instance started, a token generated) are kept
    off stderr while Ray starts or connects, so that a one-line error after it stands alone; errors
    still show. (``ray.init(logging_level=...)`` sets the level of Ray's logger for good: it is put back
    here, for Ray Tune's own warnings during the search.)"""
    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    ray_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ray_logger.setLevel(level)


@contextlib.contextmanager
def _own_session() -> Iterator[None]:
    """While Ray starts: its processes are spawned through ``ray._private.services.ConsolePopen``
    (Ray 2.x); give them ``start_new_session=True``. A Ray without that class starts as before."""
    try:
        from ray._private import services
    except ImportError:  # pragma: no cover - a Ray that moved it
        yield
        return
    original = getattr(services, "ConsolePopen", None)
    if original is None or os.name != "posix":  # pragma: no cover
        yield
        return

    class OwnSessionPopen(original):
        def __init__(self, *args, **kwargs):
            kwargs["start_new_session"] = True
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnSessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = original
