"""Search spaces: per-pcoder ranges for beta, lambda and alpha, read from ``search_spaces/*.toml``.

The constraint beta + lambda <= 1 is built into the parametrization, so every sampler sees a plain
box (no rejected or penalized trials). Per pcoder the sampled coordinates are

    beta      in [beta.low, beta.high]
    lambda_u  in [0, 1],  lambda = lambda.low + lambda_u * (min(lambda.high, 1 - beta) - lambda.low)
    alpha     in [alpha.low, alpha.high]  (optionally log-scaled)

Fixed values are not sampled. The top pcoder receives no feedback (the dynamics ignore its lambda),
so its lambda is never searched and is reported as 0. A file looks like::

    num_pcoders = 5            # optional: checked against the model
    shared = false             # true: one triple for every pcoder

    [default]                  # every pcoder not listed below
    beta = { low = 0.0, high = 1.0 }
    lambda = { low = 0.0, high = 0.5 }
    alpha = 0.0                # a number fixes the value

    [pcoder1]
    alpha = { low = 1e-4, high = 1e-1, log = true }
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pctune.errors import PctuneError
from pctune.models.spec import read_toml
from pctune.pc.hyperparameters import FIELDS, Hyperparameters

_TOL = 1e-9


@dataclass(frozen=True)
class Range:
    """A closed interval; ``low == high`` is a fixed value (not sampled)."""

    low: float
    high: float
    log: bool = False

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def contains(self, value: float) -> bool:
        return self.low - _TOL <= value <= self.high + _TOL

    def describe(self) -> str:
        if self.fixed:
            return f"{self.low:g}"
        return f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


@dataclass(frozen=True)
class PcoderRanges:
    beta: Range
    lambda_: Range
    alpha: Range

    def get(self, name: str) -> Range:
        return {"beta": self.beta, "lambda": self.lambda_, "alpha": self.alpha}[name]


@dataclass
class SearchSpace:
    """The resolved space of one model: one :class:`PcoderRanges` per pcoder."""

    pcoders: list[PcoderRanges]
    shared: bool = False
    source: str = "<search space>"
    notes: list[str] = field(default_factory=list)

    @property
    def num_pcoders(self) -> int:
        return len(self.pcoders)

    # -- the sampled coordinates ----------------------------------------------------------------
    def groups(self) -> list[tuple[str, PcoderRanges]]:
        """(prefix, ranges) of every independently sampled triple: ``shared`` or ``pcoder{n}``."""
        if self.shared:
            return [("shared", self.pcoders[0])]
        return [(f"pcoder{n}", r) for n, r in enumerate(self.pcoders, start=1)]

    def dimensions(self) -> dict[str, Range]:
        """Every sampled coordinate with its box (``pcoder1.beta``, ``pcoder1.lambda_u``, ...)."""
        dims: dict[str, Range] = {}
        for prefix, ranges in self.groups():
            if not ranges.beta.fixed:
                dims[f"{prefix}.beta"] = ranges.beta
            if not ranges.lambda_.fixed:
                dims[f"{prefix}.lambda_u"] = Range(0.0, 1.0)
            if not ranges.alpha.fixed:
                dims[f"{prefix}.alpha"] = ranges.alpha
        return dims

    def decode(self, coords: Mapping[str, float]) -> Hyperparameters:
        """The hyperparameters of a point given in sampled coordinates."""
        triples = {}
        for prefix, ranges in self.groups():
            beta = _value(coords, f"{prefix}.beta", ranges.beta)
            alpha = _value(coords, f"{prefix}.alpha", ranges.alpha)
            if ranges.lambda_.fixed:
                lam = ranges.lambda_.low
            else:
                u = float(coords[f"{prefix}.lambda_u"])
                low = ranges.lambda_.low
                high = max(low, min(ranges.lambda_.high, 1.0 - beta))
                lam = min(low + u * (high - low), 1.0 - beta)
            triples[prefix] = (beta, max(lam, 0.0), alpha)
        if self.shared:
            rows = [triples["shared"]] * self.num_pcoders
        else:
            rows = [triples[f"pcoder{n}"] for n in range(1, self.num_pcoders + 1)]
        beta, lam, alpha = (list(col) for col in zip(*rows, strict=True))
        if not self.shared:
            lam[-1] = 0.0
        return Hyperparameters(beta, lam, alpha)

    def encode(self, hp: Hyperparameters, label: str = "starting point") -> tuple[dict[str, float], list[str]]:
        """Sampled coordinates of ``hp``, and notes on values replaced by the space's fixed values.

        Raises PctuneError naming the pcoder and field when a searched value is outside its range.
        """
        hp = hp.for_pcoders(self.num_pcoders)
        triples = hp.triples()
        notes: list[str] = []
        coords: dict[str, float] = {}
        for prefix, ranges in self.groups():
            if self.shared:
                _check_shared(triples, label, self.source)
                b, lam, a = triples[0]
            else:
                n = int(prefix[len("pcoder"):])
                b, lam, a = triples[n - 1]
                if n == self.num_pcoders:
                    lam = 0.0
            where = f"{self.source}: {label}: {prefix}"
            b = _project(coords, notes, where, f"{prefix}.beta", "beta", b, ranges.beta)
            a = _project(coords, notes, where, f"{prefix}.alpha", "alpha", a, ranges.alpha)
            if ranges.lambda_.fixed:
                if abs(lam - ranges.lambda_.low) > _TOL:
                    notes.append(f"{where}: lambda {lam:g} replaced by the fixed {ranges.lambda_.low:g}")
                continue
            if not ranges.lambda_.contains(lam):
                raise PctuneError(f"{where}: lambda = {lam:g} is outside the search range "
                                  f"{ranges.lambda_.describe()}")
            low = ranges.lambda_.low
            high = max(low, min(ranges.lambda_.high, 1.0 - b))
            if lam > high + _TOL:
                raise PctuneError(f"{where}: beta + lambda = {b + lam:g} exceeds 1")
            coords[f"{prefix}.lambda_u"] = 0.0 if high - low <= 0 else min(1.0, max(0.0, (lam - low) / (high - low)))
        return coords, notes

    def only(self, pcoder: int, others: Hyperparameters) -> SearchSpace:
        """The space that searches pcoder ``pcoder`` (1-based) alone, every other pcoder fixed at
        ``others`` (the per-pcoder strategy)."""
        if self.shared:
            raise PctuneError(f"{self.source}: the per-pcoder strategy needs a space with shared = false")
        triples = others.for_pcoders(self.num_pcoders).triples()
        pcoders = [
            r if n == pcoder else PcoderRanges(*(Range(v, v) for v in triples[n - 1]))
            for n, r in enumerate(self.pcoders, start=1)
        ]
        return SearchSpace(pcoders=pcoders, shared=False, source=f"{self.source} (pcoder{pcoder})")

    def describe(self) -> str:
        lines = []
        for prefix, ranges in self.groups():
            parts = [f"{name}={ranges.get(name).describe()}" for name in FIELDS]
            lines.append(f"{prefix}: " + " ".join(parts))
        return "\n".join(lines)


def _value(coords: Mapping[str, float], key: str, rng: Range) -> float:
    return rng.low if rng.fixed else float(coords[key])


def _project(coords: dict, notes: list, where: str, key: str, name: str, value: float, rng: Range) -> float:
    if rng.fixed:
        if abs(value - rng.low) > _TOL:
            notes.append(f"{where}: {name} {value:g} replaced by the fixed {rng.low:g}")
        return rng.low
    if not rng.contains(value):
        raise PctuneError(f"{where}: {name} = {value:g} is outside the search range {rng.describe()}")
    value = min(max(value, rng.low), rng.high)
    coords[key] = value
    return value


def _check_shared(triples: list, label: str, source: str) -> None:
    first = triples[0]
    for n, (b, lam, a) in enumerate(triples[:-1], start=1):
        if max(abs(b - first[0]), abs(lam - first[1]), abs(a - first[2])) > _TOL:
            raise PctuneError(f"{source}: {label}: pcoder{n}: the space shares one triple across pcoders "
                              "but this point's triples differ")
    b, _, a = triples[-1]
    if max(abs(b - first[0]), abs(a - first[2])) > _TOL:
        raise PctuneError(f"{source}: {label}: pcoder{len(triples)}: the space shares one triple across "
                          "pcoders but this point's triples differ")


# -- reading files ------------------------------------------------------------------------------
_DEFAULT_RANGES = {"beta": {"low": 0.0, "high": 1.0}, "lambda": {"low": 0.0, "high": 1.0}, "alpha": 0.0}


def load_space(path: str | Path, num_pcoders: int) -> SearchSpace:
    """Read a search-space TOML for a model with ``num_pcoders`` pcoders."""
    return space_from_mapping(read_toml(path), num_pcoders, source=str(path))


def space_from_mapping(data: Mapping[str, Any], num_pcoders: int, source: str = "<search space>") -> SearchSpace:
    known_top = {"num_pcoders", "shared", "default", "description", "model"}
    for key in data:
        if key not in known_top and not str(key).startswith("pcoder"):
            raise PctuneError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(known_top))}, "
                              "pcoder1, pcoder2, ...)")
    declared = data.get("num_pcoders")
    if declared is not None and declared != num_pcoders:
        raise PctuneError(f"{source}: num_pcoders = {declared} but the model has {num_pcoders} pcoders")
    shared = data.get("shared", False)
    if not isinstance(shared, bool):
        raise PctuneError(f"{source}: shared must be true or false, got {shared!r}")
    default = data.get("default", {})
    if not isinstance(default, Mapping):
        raise PctuneError(f"{source}: default must be a table")
    if default:
        _pcoder_ranges({**_DEFAULT_RANGES, **default}, f"{source}: default", top=False)
    tables = _pcoder_tables(data, num_pcoders, source)
    if shared and tables:
        raise PctuneError(f"{source}: {min(tables)}: a shared space takes only a [default] table")
    pcoders = []
    for n in range(1, num_pcoders + 1):
        table = {**_DEFAULT_RANGES, **default, **tables.get(n, {})}
        where = f"{source}: pcoder{n}" if n in tables or not default else f"{source}: default (pcoder{n})"
        pcoders.append(_pcoder_ranges(table, where, top=(n == num_pcoders and not shared)))
    return SearchSpace(pcoders=pcoders, shared=shared, source=source)


def _pcoder_tables(data: Mapping, num_pcoders: int, source: str) -> dict[int, Mapping]:
    tables = {}
    for key, table in data.items():
        key = str(key)
        if not key.startswith("pcoder"):
            continue
        suffix = key[len("pcoder"):]
        if not suffix.isdigit() or int(suffix) < 1:
            raise PctuneError(f"{source}: {key}: unknown pcoder (pcoders are pcoder1..pcoder{num_pcoders})")
        if int(suffix) > num_pcoders:
            raise PctuneError(f"{source}: {key}: unknown pcoder (the model has {num_pcoders} pcoders)")
        if not isinstance(table, Mapping):
            raise PctuneError(f"{source}: {key}: must be a table")
        tables[int(suffix)] = table
    return tables


def _pcoder_ranges(table: Mapping, where: str, top: bool) -> PcoderRanges:
    unknown = sorted(set(table) - set(FIELDS))
    if unknown:
        raise PctuneError(f"{where}: unknown field {unknown[0]!r} (beta, lambda, alpha)")
    beta = _range(table["beta"], f"{where}: beta", upper=1.0)
    lam = Range(0.0, 0.0) if top else _range(table["lambda"], f"{where}: lambda", upper=1.0)
    alpha = _range(table["alpha"], f"{where}: alpha", upper=math.inf)
    if beta.low + lam.low > 1 + _TOL:
        raise PctuneError(f"{where}: beta.low + lambda.low = {beta.low + lam.low:g} > 1: no point satisfies "
                          "beta + lambda <= 1")
    if beta.high + lam.low > 1 + _TOL:
        raise PctuneError(f"{where}: beta.high + lambda.low = {beta.high + lam.low:g} > 1: lower beta.high "
                          f"to {1 - lam.low:g} or lambda.low so every beta has a feasible lambda")
    return PcoderRanges(beta=beta, lambda_=lam, alpha=alpha)


def _range(spec: Any, where: str, upper: float) -> Range:
    bound = "[0, 1]" if upper == 1.0 else "[0, inf)"
    if isinstance(spec, bool):
        raise PctuneError(f"{where}: expected a number or {{low, high}}, got {spec!r}")
    if isinstance(spec, int | float):
        value = float(spec)
        if not (0.0 <= value <= upper) or not math.isfinite(value):
            raise PctuneError(f"{where}: {value:g} is outside {bound}")
        return Range(value, value)
    if not isinstance(spec, Mapping):
        raise PctuneError(f"{where}: expected a number or {{low, high}}, got {spec!r}")
    unknown = sorted(set(spec) - {"low", "high", "log"})
    if unknown:
        raise PctuneError(f"{where}: unknown key {unknown[0]!r} (low, high, log)")
    for key in ("low", "high"):
        if key not in spec:
            raise PctuneError(f"{where}: missing {key}")
        if isinstance(spec[key], bool) or not isinstance(spec[key], int | float):
            raise PctuneError(f"{where}: {key} must be a number, got {spec[key]!r}")
    low, high, log = float(spec["low"]), float(spec["high"]), spec.get("log", False)
    if not isinstance(log, bool):
        raise PctuneError(f"{where}: log must be true or false, got {log!r}")
    for key, value in (("low", low), ("high", high)):
        if not math.isfinite(value) or not 0.0 <= value <= upper:
            raise PctuneError(f"{where}: {key} = {value:g} is outside {bound}")
    if low > high:
        raise PctuneError(f"{where}: low = {low:g} > high = {high:g}")
    if log and low <= 0:
        raise PctuneError(f"{where}: a log-scaled range needs low > 0, got {low:g}")
    return Range(low, high, log)


class SpaceSampler:
    """Optuna define-by-run function for ``OptunaSearch``: samples the box coordinates and returns
    the decoded hyperparameters as ``pcoder{n}.beta/lambda/alpha`` config keys. A class (not a
    closure) so that Ray Tune can pickle it with the searcher's state."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial) -> dict[str, float]:
        coords = {
            name: trial.suggest_float(name, rng.low, rng.high, log=rng.log)
            for name, rng in self.space.dimensions().items()
        }
        return hparams_to_config(self.space.decode(coords))


def hparams_to_config(hp: Hyperparameters) -> dict[str, float]:
    """``{"pcoder1.beta": .., "pcoder1.lambda": .., "pcoder1.alpha": .., ...}``."""
    return hp.to_params()


def hparams_from_config(config: Mapping[str, Any], num_pcoders: int) -> Hyperparameters:
    """The inverse of :func:`hparams_to_config` (extra keys are ignored)."""
    return Hyperparameters.from_params(config, num_pcoders)
