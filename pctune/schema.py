"""Typed TOML tables: a dataclass states a table's keys, their types and their defaults once.

:func:`read_table` builds a dataclass from a TOML table. The keys are the dataclass's fields, a field
without a default is required, and every value is checked against the field's type annotation:
``str``, ``int``, ``float`` (integers accepted), ``bool``, ``X | Y`` (``X | None``: optional; TOML has
no null, so an empty string reads as None), ``list[X]`` (every element checked), ``dict``/``dict[str, X]``,
nested dataclasses (an inline table, read the same way) and ``Any`` (taken as is). Errors are one line
naming the file, the table and the key::

    jobs/demo.toml: [promotion.noise]: unknown key 'sigmass' (known: num_images, seed, sigmas, timesteps)
    jobs/demo.toml: objective.sigma: expected a number, got 'high'
    jobs/demo.toml: model.name: missing

Every float must be finite and every ``seed``/``*_seed`` field in numpy's and torch's range (0..2**32-1);
other range checks (``must be >= 1``) stay with the code that owns the table; :func:`error` and
:func:`at_least` format them the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from pctune.errors import PctuneError

T = TypeVar("T")

_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
          dict: "a table"}


def read_table(cls: type[T], table: Any, source: str, where: str, *, given: Mapping[str, Any] | None = None,
               readers: Mapping[str, Callable[[Any, str], Any]] | None = None,
               extra_keys: Iterable[str] = ()) -> T:
    """``cls`` (a dataclass) built from the TOML table ``table`` found at ``where`` (dotted: ``promotion.noise``)
    in ``source`` (a file name).

    ``given``: fields the caller sets itself (not keys of the table); ``readers``: keys whose value the
    caller reads, ``readers[key](value, "where.key")`` (absent: the field's default); ``extra_keys``: keys
    allowed in the table that are no field (the caller reads them from ``table``). A ``PctuneError`` raised
    by ``cls`` itself (``__post_init__``) is prefixed with the file and the table.
    """
    if not isinstance(table, Mapping):
        raise PctuneError(f"{source}: {where} must be a table, got {table!r}")
    given = dict(given or {})
    readers = dict(readers or {})
    hints = field_types(cls)
    keys = [name for name in hints if name not in given]
    label = where if where.endswith("]") else f"[{where}]"  # an array element: attacks[2], not [attacks[2]]
    no_unknown(table, [*keys, *extra_keys], f"{source}: {label}")
    values: dict[str, Any] = dict(given)
    for name in keys:
        path = f"{where}.{name}"
        if name not in table:
            if name in required_fields(cls):
                raise PctuneError(f"{source}: {path}: missing")
            continue
        if name in readers:
            values[name] = readers[name](table[name], path)
        else:
            values[name] = convert(hints[name], table[name], source, path)
        if name == "seed" or name.endswith("_seed"):
            seed_in_range(values[name], source, path)
    try:
        return cls(**values)
    except PctuneError as exc:
        raise PctuneError(f"{source}: {where}: {exc}") from exc


def convert(hint: Any, value: Any, source: str, where: str) -> Any:
    """``value`` checked against the type ``hint`` (and converted: int -> float, a table -> a dataclass)."""
    if hint is Any:
        return value
    options = _union_options(hint)
    if options is not None:
        if type(None) in options:
            if value == "":  # TOML has no null: an empty string means unset
                return None
            options = [o for o in options if o is not type(None)]
        for option in options:
            if _outer_matches(option, value):
                return convert(option, value, source, where)
        raise _type_error(options, value, source, where)
    if not _outer_matches(hint, value):
        raise _type_error([hint], value, source, where)
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if hint is float:
        if not math.isfinite(value):
            raise PctuneError(f"{source}: {where}: expected a finite number, got {value!r}")
        return float(value)
    if origin is list:
        if not args:
            return list(value)
        return [convert(args[0], item, source, f"{where}[{i}]") for i, item in enumerate(value, start=1)]
    if origin in (dict, Mapping):
        if len(args) == 2 and args[1] is not Any:
            return {key: convert(args[1], item, source, f"{where}.{key}") for key, item in value.items()}
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return read_table(hint, value, source, where)
    return value


def no_unknown(table: Mapping, known: Iterable[str], where: str) -> None:
    """An error naming the first unknown key of ``table``; ``where`` prefixes the message."""
    known = sorted(set(known))
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise PctuneError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(known)})")


def error(source: str, where: str, message: str) -> PctuneError:
    """``source: where: message``, the format of every job error."""
    return PctuneError(f"{source}: {where}: {message}")


def at_least(value: float | None, low: float, source: str, where: str, note: str = "") -> None:
    """``must be >= low`` unless ``value`` is None or at least ``low`` (and finite); ``note`` follows ``low``."""
    if value is not None and not math.isfinite(value):
        raise error(source, where, f"must be a finite number, got {value}")
    if value is not None and value < low:
        raise error(source, where, f"must be >= {low}{note}, got {value}")


#: the seeds numpy and torch accept (numpy's RandomState: 0 .. 2**32 - 1)
SEED_RANGE = (0, 2**32 - 1)


def seed_in_range(value: int | None, source: str, where: str) -> None:
    """A seed numpy and torch both accept, checked when the file is read (not when it is first used)."""
    if value is not None and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise error(source, where, f"must be in {SEED_RANGE[0]}..{SEED_RANGE[1]}, got {value}")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's fields and their (resolved) type annotations, in declaration order."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


@functools.cache
def required_fields(cls: type) -> frozenset[str]:
    """The fields of a dataclass without a default."""
    missing = dataclasses.MISSING
    return frozenset(f.name for f in dataclasses.fields(cls)
                     if f.init and f.default is missing and f.default_factory is missing)


def type_name(hint: Any) -> str:
    """How errors name a type: ``a number``, ``a string or a list``, ..."""
    options = _union_options(hint)
    if options is not None:
        return " or ".join(type_name(o) for o in options if o is not type(None))
    origin = typing.get_origin(hint) or hint
    if dataclasses.is_dataclass(origin) or origin is Mapping:
        return "a table"
    return _NAMES.get(origin, getattr(origin, "__name__", str(origin)))


def _union_options(hint: Any) -> list | None:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return list(typing.get_args(hint))
    return None


def _outer_matches(hint: Any, value: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if origin is int:
        return isinstance(value, int)
    if origin is float:
        return isinstance(value, int | float)
    if origin is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list)
    if origin in (dict, Mapping) or dataclasses.is_dataclass(origin):
        return isinstance(value, Mapping)
    return isinstance(value, origin)


def _type_error(options: list, value: Any, source: str, where: str) -> PctuneError:
    names = " or ".join(dict.fromkeys(type_name(o) for o in options))
    return PctuneError(f"{source}: {where}: expected {names}, got {value!r}")
