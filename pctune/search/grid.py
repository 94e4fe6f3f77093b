"""The single-pcoder grid sweep (strategy ``"single-pcoder-grid"``; Choksi et al., ESANN 2025, Fig. 3).

One Tune experiment per pcoder, as the per-pcoder strategy, but exhaustive and with every other
pcoder feedforward (beta = 1, lambda = alpha = 0, not the model's default preset): pcoder n takes
every point of a (lambda, beta) grid, its alpha fixed at the search space's value. The grid comes
from the job's ``search.grid``: ``beta`` and ``lambda`` lists, or ``points`` evenly spaced values
over the space's range of each (default 5). Points with beta + lambda > 1 break the dynamics'
constraint and are **skipped**, as the study did (not projected: a projected point would repeat
another). The top pcoder receives no feedback, so its grid is over beta alone (lambda = 0).

The grid reaches Ray Tune through Optuna's ``GridSampler`` inside Ray's ``OptunaSearch``: the sampler
enumerates one integer parameter, ``pcoder{n}.grid_point``, the index of a point in the list of
feasible points (a Cartesian grid of beta and lambda could not leave the infeasible corner out), and
:class:`GridPoints` turns the index into the trial's hyperparameters. Tune's ``num_samples`` is the
number of feasible points: Optuna gives trial k the k-th point of the (seeded) shuffled grid, so every
point is run exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from optuna.samplers import GridSampler

from pctune.errors import PctuneError
from pctune.pc.hyperparameters import Hyperparameters
from pctune.schema import error, no_unknown
from pctune.search.schedulers import FidelityOptunaSearch
from pctune.search.space import Range, SearchSpace, hparams_to_config

GRID_STRATEGY = "single-pcoder-grid"
_TOL = 1e-9


@dataclass(frozen=True)
class GridSpec:
    """``search.grid``: the values of beta and lambda to sweep (None: ``points`` evenly spaced values
    over the search space's range)."""

    beta: tuple[float, ...] | None = None
    lambda_: tuple[float, ...] | None = None
    points: int = 5


def read_grid(value: Any, source: str, where: str) -> GridSpec:
    """``search.grid`` checked: ``{ beta = [...], lambda = [...], points = N }``, every key optional."""
    if not isinstance(value, Mapping):
        raise error(source, where, "must be a table such as { points = 5 } or { beta = [0.5, 1], lambda = [0, 0.5] }")
    no_unknown(value, ["beta", "lambda", "points"], f"{source}: {where}")
    points = value.get("points", 5)
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise error(source, f"{where}.points", f"must be an integer >= 1, got {points!r}")
    return GridSpec(_values(value.get("beta"), source, f"{where}.beta"),
                    _values(value.get("lambda"), source, f"{where}.lambda"), points)


#: [search] keys that the grid sweep decides itself: written in a grid job, they would be ignored
_GRID_DECIDES = {"num_samples": "one trial per grid point", "sampler": "Optuna's GridSampler",
                 "starting_points": "the grid only", "defaults": "the other pcoders feedforward"}


def check_grid_search(cfg, table: Mapping, source: str) -> None:
    """``[search]`` (a ``SearchConfig`` read from ``table``) checked for the grid sweep, its ``grid``
    set to the default grid when the job gives none (:class:`pctune.search.strategies.SinglePcoderGrid`)."""
    for key, why in _GRID_DECIDES.items():
        if key in table:
            raise error(source, f"search.{key}", f"strategy = '{GRID_STRATEGY}' decides it ({why}): leave it out")
    cfg.grid = cfg.grid or GridSpec()


def _values(values: Any, source: str, where: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    if not isinstance(values, list) or not values:
        raise error(source, where, f"must be a non-empty list of numbers in [0, 1], got {values!r}")
    for i, v in enumerate(values, start=1):
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
            raise error(source, f"{where}[{i}]", f"must be a number in [0, 1], got {v!r}")
    return tuple(sorted({float(v) for v in values}))


@dataclass(frozen=True)
class PcoderGrid:
    """The feasible grid points of one pcoder, each as the whole network's hyperparameters."""

    pcoder: int
    points: list[Hyperparameters]
    skipped: int  # (beta, lambda) pairs left out because beta + lambda > 1

    @property
    def stage(self) -> str:
        return f"pcoder{self.pcoder}"

    def describe(self) -> str:
        triples = [hp.triples()[self.pcoder - 1] for hp in self.points]
        betas, lambdas = sorted({t[0] for t in triples}), sorted({t[1] for t in triples})
        return (f"{len(self.points)} grid points: beta {_show(betas)} x lambda {_show(lambdas)}, "
                f"alpha {triples[0][2]:g}" + (f" ({self.skipped} skipped: beta + lambda > 1)" if self.skipped else ""))


def _show(values: list[float]) -> str:
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


def pcoder_grids(space: SearchSpace, spec: GridSpec, where: str) -> list[PcoderGrid]:
    """Every pcoder's grid over ``space`` (one per pcoder, the others feedforward); ``where`` prefixes
    errors (``jobs/x.toml: search.grid``)."""
    if space.shared:
        raise PctuneError(f"{where}: strategy = '{GRID_STRATEGY}' needs a search space with shared = false "
                          f"({space.source})")
    return [_pcoder_grid(space, n, spec, where) for n in range(1, space.num_pcoders + 1)]


def _pcoder_grid(space: SearchSpace, n: int, spec: GridSpec, where: str) -> PcoderGrid:
    ranges = space.pcoders[n - 1]
    if not ranges.alpha.fixed:
        raise PctuneError(f"{where}: pcoder{n}: the sweep holds alpha fixed, but {space.source} gives it the range "
                          f"{ranges.alpha.describe()} (set alpha to one number, e.g. alpha = 0.01)")
    top = n == space.num_pcoders
    betas = _axis(spec.beta, spec.points, ranges.beta, f"{where}: pcoder{n}: beta")
    lambdas = [0.0] if top else _axis(spec.lambda_, spec.points, ranges.lambda_, f"{where}: pcoder{n}: lambda")
    pairs = [(b, lam) for lam in lambdas for b in betas]
    feasible = [(b, lam) for b, lam in pairs if b + lam <= 1 + _TOL]
    if not feasible:
        raise PctuneError(f"{where}: pcoder{n}: every grid point has beta + lambda > 1")
    base = Hyperparameters.feedforward(space.num_pcoders).triples()
    points = []
    for b, lam in feasible:
        triples = [list(t) for t in base]
        triples[n - 1] = [b, min(lam, 1.0 - b), ranges.alpha.low]
        points.append(Hyperparameters(*(list(col) for col in zip(*triples, strict=True))))
    return PcoderGrid(n, points, len(pairs) - len(feasible))


def _axis(values: tuple[float, ...] | None, points: int, rng: Range, where: str) -> list[float]:
    """The listed values (each inside the space's range), else ``points`` evenly spaced over it."""
    if values is None:
        if rng.fixed:
            return [rng.low]
        return sorted({round(float(v), 10) for v in np.linspace(rng.low, rng.high, points)})
    outside = [v for v in values if not rng.contains(v)]
    if outside:
        raise PctuneError(f"{where}: {outside[0]:g} is outside the search space's range {rng.describe()}")
    return list(values)


class GridPoints:
    """Define-by-run function for ``OptunaSearch`` under the grid sampler: suggests the index of a
    grid point and returns that point's ``pcoder{n}.beta/lambda/alpha``. A class, not a closure, so
    that Ray Tune can pickle it with the searcher's state."""

    def __init__(self, name: str, points: list[Hyperparameters]) -> None:
        self.name, self.points = name, points

    def __call__(self, trial) -> dict[str, float]:
        index = trial.suggest_int(self.name, 0, len(self.points) - 1)
        return hparams_to_config(self.points[index])


class ExhaustiveGrid(GridSampler):
    """Optuna's GridSampler without its stop: ``GridSampler.after_trial`` calls ``Study.stop``, which
    only works inside ``Study.optimize`` and raises under the ask-and-tell interface Ray Tune uses.
    Here Tune's ``num_samples`` (the grid's size) ends the experiment instead."""

    def after_trial(self, study, trial, state, values) -> None:
        """Nothing: see the class docstring."""


def make_grid_searcher(job, grid: PcoderGrid) -> FidelityOptunaSearch:
    """Ray Tune's OptunaSearch that runs every point of ``grid`` once (in the order of the sampler's
    seeded shuffle), scored by the job's objective."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # as make_sampler: no line per study
    name = f"{grid.stage}.grid_point"
    metric, mode = job.kinds.objective.targets()
    sampler = ExhaustiveGrid({name: list(range(len(grid.points)))}, seed=job.search.seed)
    return FidelityOptunaSearch(space=GridPoints(name, grid.points), metric=metric, mode=mode, sampler=sampler)
