"""HMAC-SHA256 signatures of the state pctune saves for ``--resume``, with a key kept outside the run
directory, so that whoever can write the (shared) storage cannot make a resume load their pickles.

The key: ``$PCTUNE_STATE_KEY`` (a secret the cluster provides: any string of at least 32 characters,
e.g. ``openssl rand -hex 32``), else the key file ``$XDG_CONFIG_HOME/pctune/state.key`` (default
``~/.config/pctune/state.key``), created on first use with 32 random bytes (written as 64 hex
characters) and mode 0600. A key file that another user can read or write is refused. A search
resumed on another machine or by another user needs the same key (copy the file, or set the
variable to its content).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from pctune.errors import PctuneError

KEY_ENV = "PCTUNE_STATE_KEY"
MIN_KEY_CHARS = 32
_cache: dict[tuple[str | None, str], bytes] = {}


def key_path() -> Path:
    """``$XDG_CONFIG_HOME/pctune/state.key`` (``~/.config/pctune/state.key`` by default)."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config).expanduser() / "pctune" / "state.key"


def key_source() -> str:
    """Where the key comes from, for messages."""
    return f"${KEY_ENV}" if os.environ.get(KEY_ENV) else str(key_path())


def state_key() -> bytes:
    """The signing key (read once per process and source; the key file is created on first use)."""
    env, path = os.environ.get(KEY_ENV) or None, key_path()
    cached = _cache.get((env, str(path)))
    if cached is not None:
        return cached
    if env is not None:
        if len(env.strip()) < MIN_KEY_CHARS:
            raise PctuneError(f"${KEY_ENV} must be at least {MIN_KEY_CHARS} characters (e.g. the output of "
                              "`openssl rand -hex 32`)")
        key = env.strip().encode()
    else:
        key = _read_key_file(path) if path.exists() else _create_key_file(path)
    _cache[(env, str(path))] = key
    return key


def _create_key_file(path: Path) -> bytes:
    """32 random bytes as hex, mode 0600, created atomically (a concurrent creator's key wins)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # fails if another process created the key meanwhile: theirs is used
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    except OSError as e:
        raise PctuneError(f"cannot create the state signing key {path}: {e.strerror or e} "
                          f"(or set ${KEY_ENV})") from None
    return _read_key_file(path)


def _read_key_file(path: Path) -> bytes:
    try:
        info = path.stat()
        if stat.S_IMODE(info.st_mode) & 0o077 or info.st_uid != os.getuid():
            raise PctuneError(f"{path}: the state signing key is readable or writable by others (mode "
                              f"{stat.S_IMODE(info.st_mode):04o}, owner uid {info.st_uid}): `chmod 600 {path}` "
                              "if it is yours and no one else saw it, else delete it (searches it signed can no "
                              "longer be resumed)")
        key = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise PctuneError(f"cannot read the state signing key {path}: {getattr(e, 'strerror', None) or e}") from None
    if len(key) < MIN_KEY_CHARS:
        raise PctuneError(f"{path}: the state signing key is shorter than {MIN_KEY_CHARS} characters: delete it "
                          f"(a new one is created) or set ${KEY_ENV}")
    return key.encode()


def sign(parts: Iterable[bytes], key: bytes) -> str:
    """HMAC-SHA256 (hex) of ``parts``, each length-prefixed (no two sequences of parts sign alike)."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(b"%d:" % len(part))
        mac.update(part)
    return mac.hexdigest()


def verify(parts: Iterable[bytes], signature: object, key: bytes) -> bool:
    return isinstance(signature, str) and hmac.compare_digest(sign(parts, key), signature)


def key_id(key: bytes) -> str:
    """A short public name of ``key`` (tells "signed with another key" from "changed after signing")."""
    return sign([b"pctune state key id"], key)[:16]
