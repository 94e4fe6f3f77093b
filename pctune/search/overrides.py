"""Overrides of job fields from the command line: ``--set KEY=VALUE`` (and the flags that name a field),
read into dotted keys and set into the job's tables before it is validated."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from typing import Any

from pctune.errors import PctuneError


def has_dotted(data: Mapping, key: str) -> bool:
    """Whether the nested tables of ``data`` hold the dotted ``key``."""
    for part in key.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return False
        data = data[part]
    return True


def set_dotted(data: dict, key: str, value: Any, where: str = "<job>") -> None:
    """Set the dotted ``key`` of ``data``, creating the tables on the way."""
    parts = key.split(".")
    table = data
    for part in parts[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise PctuneError(f"{where}: cannot set {key}: {part} is not a table")
    table[parts[-1]] = value


_DOTTED_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"search.sampler=cmaes"`` -> ``("search.sampler", "cmaes")``; the value is read as a TOML value
    (numbers, booleans, lists, quoted strings) and otherwise kept as a string."""
    if "=" not in text:
        raise PctuneError(f"--set {text!r}: expected KEY=VALUE")
    key, raw = (s.strip() for s in text.split("=", 1))
    if not _DOTTED_KEY.fullmatch(key):
        raise PctuneError(f"--set {text[:80]!r}: {key[:40]!r} is not a job field (a dotted name such as "
                          "objective.sigma)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value
