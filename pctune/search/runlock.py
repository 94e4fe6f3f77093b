"""One owner per run directory: the lock a search, a promotion and a sync hold while they write it.

The lock is the file ``<run dir>/.pctune-lock``, created with ``O_CREAT | O_EXCL`` (atomic on local
file systems and on NFS v3/v4, EFS included; ``flock``/``fcntl`` locks are not reliable there). It holds
the owner's host, pid, command and start time as JSON; a daemon thread touches it every
:data:`HEARTBEAT_S` seconds (its mtime is the heartbeat).

Stale-lock rule: a lock is stale when its owner is on this host (same host name, boot and pid
namespace, so containers sharing a host name count as other hosts) and its pid is gone (or is this
process's own pid, which this process does not hold), or when its owner is on another host and its
heartbeat is older than :data:`STALE_S` seconds (hosts' clocks must agree to within that). A lock
whose content cannot be read counts as the other-host case. A stale lock is taken over race-free: it
is renamed to a unique name first (only one process can rename it), checked to be the very lock
judged stale, then a new one is created with ``O_EXCL``; a log line says so.

The lock is re-entrant within a process (a search that syncs and promotes at its end holds it
throughout) and released when the outermost :func:`run_lock` block exits, on every path (a normal end,
an error, Ctrl-C or SIGTERM turned into an exception): it is released in ``finally``, never in a
signal handler. When this command created the run directory and leaves it empty (a search refused by
its checks), the folder is removed too.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pctune.errors import PctuneError
from pctune.utils import Log, print_line

LOCK = ".pctune-lock"
HEARTBEAT_S = float(os.environ.get("PCTUNE_LOCK_HEARTBEAT_S", "30"))
STALE_S = float(os.environ.get("PCTUNE_LOCK_STALE_S", "600"))



@dataclass
class Held:
    """This process's hold on one run directory's lock."""

    path: Path  # the run directory
    token: str
    created: list[Path]  # the folders this command created to hold the lock, deepest first
    depth: int = 1
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


_held: dict[Path, Held] = {}
_guard = threading.RLock()


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: str, log: Log = print_line) -> Iterator[Held]:
    """Hold the lock of ``run_dir`` (creating the folder if needed) for the block; ``command`` is what
    a second writer is told is running (e.g. "pctune search demo")."""
    held = acquire(Path(run_dir), command, log)
    try:
        yield held
    finally:
        release(held)


def acquire(run_dir: Path, command: str, log: Log = print_line) -> Held:
    """Take the lock (or, held by this process already, count one more hold); PctuneError naming the
    owner when another live process holds it."""
    run_dir = run_dir.resolve()
    with _guard:
        if run_dir in _held:
            _held[run_dir].depth += 1
            return _held[run_dir]
        created = _make_folder(run_dir)
        token = uuid.uuid4().hex
        try:
            _take(run_dir, _record(command, token), log)
        except BaseException:
            _remove_empty(created)
            raise
        held = Held(run_dir, token, created)
        held.thread = threading.Thread(target=_heartbeat, args=(held, log), daemon=True,
                                       name=f"pctune-lock-{run_dir.name}")
        held.thread.start()
        _held[run_dir] = held
        return held


def release(held: Held) -> None:
    """Give one hold back; the last one removes the lock file (if it is still ours) and, when this
    command created the run directory and it is empty, the folder."""
    with _guard:
        held.depth -= 1
        if held.depth > 0:
            return
        _held.pop(held.path, None)
    held.stop.set()
    if held.thread is not None:
        held.thread.join(timeout=5)
    if (owner := read_owner(lock_path(held.path))) is not None and owner.get("token") == held.token:
        with contextlib.suppress(FileNotFoundError):
            lock_path(held.path).unlink()
    _remove_empty(held.created)


def _make_folder(run_dir: Path) -> list[Path]:
    """Create ``run_dir`` (and missing parents); the folders created, deepest first."""
    missing = [p for p in [run_dir, *run_dir.parents] if not p.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PctuneError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}") from exc
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): keep it, and its parents
            return


def _record(command: str, token: str) -> bytes:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "pid_space": _pid_space(),
                       "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       "token": token}).encode()


def _pid_space() -> str:
    """Where a pid means this process: the boot and the pid namespace (containers that share a host
    name, or a host rebooted under the same name, have other pids); empty where /proc does not say."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _same_pid_space(owner: dict) -> bool:
    """The owner's pid can be looked up from here: same host name, and the same boot and pid namespace
    (a lock without that record, from an older pctune, is judged by the host name alone)."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    return owner.get("pid_space", _pid_space()) == _pid_space()


def _create(path: Path, record: bytes) -> bool:
    """Create the lock file with O_EXCL; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise PctuneError(f"cannot create the lock {path}: {exc.strerror or exc}") from exc
    try:
        os.write(fd, record)
        os.fsync(fd)
    except OSError as exc:  # a full disk: leave no empty lock that would read as a live unknown owner
        os.close(fd)
        path.unlink(missing_ok=True)
        raise PctuneError(f"cannot write the lock {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    return True


def _take(run_dir: Path, record: bytes, log: Log) -> None:
    """Create the lock, taking over a stale one; PctuneError when a live owner holds it."""
    path = lock_path(run_dir)
    for _ in range(5):
        if _create(path, record):
            return
        owner = _settled_owner(path)
        if owner is None:  # released in the meantime
            continue
        reason = stale_reason(owner, path)
        if reason is None:
            raise _in_use(run_dir, owner)
        if _move_aside(path, owner):
            log(f"taking over the stale lock of {run_dir} ({describe(owner)}: {reason})")
    raise PctuneError(f"{run_dir}: could not take the lock {path} (other processes keep taking it); try again")


def _in_use(run_dir: Path, owner: dict) -> PctuneError:
    return PctuneError(f"{run_dir} is in use by {describe(owner)}: wait for it to finish (or stop it); "
                       f"a lock whose owner is gone is taken over automatically, see {lock_path(run_dir)}")


def check_free(run_dir: str | Path) -> None:
    """Without taking it: the PctuneError a second writer would get when another live process holds
    the lock of ``run_dir`` (for checks that run before a command, such as ``pctune check``)."""
    owner = other_owner(run_dir)
    if owner is not None:
        raise _in_use(Path(run_dir).resolve(), owner)


def other_owner(run_dir: str | Path) -> dict | None:
    """The record of another live process holding the lock of ``run_dir`` (None: free, stale, or held by
    this process); :func:`describe` says who it is."""
    run_dir = Path(run_dir).resolve()
    with _guard:
        if run_dir in _held:
            return None
    owner = _settled_owner(lock_path(run_dir))
    return owner if owner is not None and stale_reason(owner, lock_path(run_dir)) is None else None


def _settled_owner(path: Path) -> dict | None:
    """The lock's record; a lock being written (empty for a moment) is read again; None if gone."""
    for _ in range(10):
        owner = read_owner(path)
        if owner is None or owner.get("pid") is not None or _age(path) > 2:
            return owner
        time.sleep(0.1)
    return owner


def read_owner(path: Path) -> dict | None:
    """The lock's record (``{}`` when unreadable), or None when there is no lock."""
    try:
        data = json.loads(path.read_bytes() or b"{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def stale_reason(owner: dict, path: Path) -> str | None:
    """Why the lock of ``owner`` is stale (the rule in the module docstring), or None if it is live."""
    if _same_pid_space(owner):
        pid = owner["pid"]
        if pid == os.getpid():
            return "its pid is this process's, which does not hold it"
        return None if _alive(pid) else "that process is gone"
    age = _age(path)
    if age > STALE_S:
        return f"no heartbeat for {age / 60:.0f} min"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _move_aside(path: Path, owner: dict) -> bool:
    """Rename the stale lock to a unique name (one process wins the rename) and delete it; if what was
    renamed is not the lock judged stale (another process took it over first), put it back."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if read_owner(aside) != owner:
        with contextlib.suppress(OSError):
            os.link(aside, path)  # never over a lock created since
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def describe(owner: dict) -> str:
    if not owner:
        return "an unknown process (its lock cannot be read)"
    return (f"`{owner.get('command', 'pctune')}` (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, "
            f"since {owner.get('since', '?')})")


def _heartbeat(held: Held, log: Log) -> None:
    """Touch the lock every HEARTBEAT_S seconds while it is ours."""
    path = lock_path(held.path)
    while not held.stop.wait(HEARTBEAT_S):
        owner = read_owner(path)
        if owner is None or owner.get("token") != held.token:
            taken = f"taken over by {describe(owner)}" if owner is not None else "removed"
            log(f"warning: the lock {path} was {taken}; this process no longer owns the run directory")
            return
        with contextlib.suppress(OSError):
            os.utime(path)
