"""Per-pcoder coefficients beta (feedforward), lambda (feedback) and alpha (error correction)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pctune.errors import PctuneError

Number = float | int
Values = Number | Sequence[Number]

#: Names accepted for each coefficient in mappings (pctune's own and Predify's).
_ALIASES = {
    "beta": ("beta", "feedforward", "ffm"),
    "lambda": ("lambda", "lambda_", "feedback", "fbm"),
    "alpha": ("alpha", "pc", "erm"),
}

#: Flat parameter names, as in trial configs and MLflow params: ``pcoder3.lambda``.
PARAM_PATTERN = re.compile(r"^pcoder(\d+)\.(beta|lambda|alpha)$")
FIELDS = ("beta", "lambda", "alpha")


def _as_tuple(name: str, values: Values) -> tuple[float, ...]:
    if isinstance(values, int | float):
        return (float(values),)
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise PctuneError(f"{name} must be a number or a list of numbers, got {values!r}") from exc


@dataclass(frozen=True)
class Hyperparameters:
    """One (beta, lambda, alpha) triple per pcoder, validated against the dynamics' constraints.

    ``Hyperparameters(beta=[...], lambda_=[...], alpha=[...])`` takes one value per pcoder; plain
    numbers give one triple shared by every pcoder (expanded by :meth:`for_pcoders` once the model's
    pcoder count is known). Constraints: 0 <= beta, 0 <= lambda, beta + lambda <= 1, 0 <= alpha,
    no NaN or inf. The top pcoder's lambda is ignored by the dynamics (it receives no feedback).
    """

    beta: tuple[float, ...]
    lambda_: tuple[float, ...]
    alpha: tuple[float, ...]

    def __init__(self, beta: Values, lambda_: Values, alpha: Values = 0.0) -> None:
        b, l, a = _as_tuple("beta", beta), _as_tuple("lambda", lambda_), _as_tuple("alpha", alpha)
        n = max(len(b), len(l), len(a))
        expanded = []
        for vals in (b, l, a):
            if len(vals) == 1:
                vals = vals * n
            elif len(vals) != n:
                raise PctuneError(
                    f"beta, lambda and alpha need one value per pcoder: got {len(b)}, {len(l)}, {len(a)}"
                )
            expanded.append(vals)
        object.__setattr__(self, "beta", expanded[0])
        object.__setattr__(self, "lambda_", expanded[1])
        object.__setattr__(self, "alpha", expanded[2])
        object.__setattr__(self, "_shared", n == 1 and not any(isinstance(v, Sequence) for v in (beta, lambda_, alpha)))
        self._validate()

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def shared(cls, beta: float, lambda_: float, alpha: float = 0.0) -> Hyperparameters:
        """One triple for every pcoder."""
        return cls(beta, lambda_, alpha)

    @classmethod
    def feedforward(cls, num_pcoders: int) -> Hyperparameters:
        """beta=1, lambda=0, alpha=0: every timestep equals the plain feedforward pass."""
        return cls([1.0] * num_pcoders, [0.0] * num_pcoders, [0.0] * num_pcoders)

    @classmethod
    def from_mapping(cls, mapping: Mapping, num_pcoders: int | None = None) -> Hyperparameters:
        """Build from ``{"pcoder1": {"beta": .., "lambda": .., "alpha": ..}, ...}``, from
        ``{"beta": [...] or x, "lambda": ..., "alpha": ...}``, or from ``{"hyperparameters": ...}``.

        Predify's key names (feedforward/feedback/pc) are accepted too.
        """
        if "hyperparameters" in mapping and isinstance(mapping["hyperparameters"], Mapping):
            mapping = mapping["hyperparameters"]
        pcoder_keys = [k for k in mapping if str(k).startswith("pcoder")]
        if pcoder_keys:
            return cls._from_pcoder_tables(mapping, pcoder_keys, num_pcoders)
        return cls(*(_lookup(mapping, field, "hyperparameters") for field in ("beta", "lambda", "alpha")))

    @classmethod
    def _from_pcoder_tables(cls, mapping: Mapping, keys: list, num_pcoders: int | None) -> Hyperparameters:
        indices = {}
        for key in keys:
            suffix = str(key)[len("pcoder"):]
            if not suffix.isdigit() or int(suffix) < 1:
                raise PctuneError(f"{key}: pcoder keys are pcoder1, pcoder2, ... (numbered from 1)")
            indices[int(suffix)] = mapping[key]
        count = num_pcoders if num_pcoders is not None else max(indices)
        extra = sorted(i for i in indices if i > count)
        if extra:
            raise PctuneError(f"pcoder{extra[0]}: the model has only {count} pcoders")
        missing = [i for i in range(1, count + 1) if i not in indices]
        if missing:
            raise PctuneError(f"pcoder{missing[0]}: missing (expected pcoder1..pcoder{count})")
        triples = [
            [_lookup(indices[i], field, f"pcoder{i}") for field in ("beta", "lambda", "alpha")]
            for i in range(1, count + 1)
        ]
        return cls(*(list(col) for col in zip(*triples, strict=True)))

    # -- use ----------------------------------------------------------------------------------------
    @property
    def num_pcoders(self) -> int | None:
        """The number of pcoders, or None for a shared triple not yet bound to a model."""
        return None if self._shared else len(self.beta)

    def for_pcoders(self, num_pcoders: int) -> Hyperparameters:
        """These hyperparameters for a model with ``num_pcoders`` pcoders (a shared triple expands)."""
        if self._shared:
            return Hyperparameters([self.beta[0]] * num_pcoders, [self.lambda_[0]] * num_pcoders,
                                   [self.alpha[0]] * num_pcoders)
        if len(self.beta) != num_pcoders:
            raise PctuneError(
                f"the model has {num_pcoders} pcoders but {len(self.beta)} hyperparameter triples were given"
            )
        return self

    def triples(self) -> list[tuple[float, float, float]]:
        return list(zip(self.beta, self.lambda_, self.alpha, strict=True))

    def to_mapping(self) -> dict[str, dict[str, float]]:
        """``{"pcoder1": {"beta": .., "lambda": .., "alpha": ..}, ...}`` (the TOML layout)."""
        return {
            f"pcoder{i}": {"beta": b, "lambda": l, "alpha": a}
            for i, (b, l, a) in enumerate(self.triples(), start=1)
        }

    def to_params(self) -> dict[str, float]:
        """Flat ``{"pcoder1.beta": .., "pcoder1.lambda": .., "pcoder1.alpha": .., ...}``, pcoder by pcoder."""
        return {f"pcoder{n}.{name}": float(value) for n, triple in enumerate(self.triples(), start=1)
                for name, value in zip(FIELDS, triple, strict=True)}

    @classmethod
    def from_params(cls, params: Mapping, num_pcoders: int | None = None) -> Hyperparameters:
        """The inverse of :meth:`to_params`; keys that are not ``pcoder{n}.{field}`` are ignored, and
        ``num_pcoders`` defaults to the highest pcoder number present."""
        found = [int(m.group(1)) for k in params if (m := PARAM_PATTERN.match(str(k)))]
        count = num_pcoders if num_pcoders is not None else max(found, default=0)
        try:
            cols = [[float(params[f"pcoder{n}.{name}"]) for n in range(1, count + 1)] for name in FIELDS]
        except KeyError as exc:
            raise PctuneError(f"trial config has no {exc.args[0]!r}") from exc
        return cls(*cols)

    def to_toml(self) -> str:
        lines = []
        for key, table in self.to_mapping().items():
            lines.append(f"[hyperparameters.{key}]")
            lines.extend(f"{field} = {value!r}" for field, value in table.items())
            lines.append("")
        return "\n".join(lines)

    def _validate(self) -> None:
        for i, (b, l, a) in enumerate(self.triples(), start=1):
            where = "shared hyperparameters" if self._shared else f"pcoder{i}"
            for field, value in (("beta", b), ("lambda", l), ("alpha", a)):
                if not math.isfinite(value):
                    raise PctuneError(f"{where}: {field} must be a finite number, got {value}")
                if value < 0:
                    raise PctuneError(f"{where}: {field} must be >= 0, got {value}")
            if b + l > 1 + 1e-9:
                raise PctuneError(f"{where}: beta + lambda must be <= 1, got {b} + {l} = {b + l:.6g}")


def _lookup(table: Mapping, field: str, where: str) -> Values:
    if not isinstance(table, Mapping):
        raise PctuneError(f"{where}: expected a table with beta, lambda and alpha, got {table!r}")
    found = [name for name in _ALIASES[field] if name in table]
    if not found:
        if field == "alpha":
            return 0.0
        raise PctuneError(f"{where}: missing {field}")
    return table[found[0]]
