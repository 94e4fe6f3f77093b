"""The search strategies a job can name (``[search] strategy``): THE table of them, :data:`STRATEGIES`.

A strategy plans the Tune experiments ("stages") of a search and combines their results:

- ``joint``: one experiment over the whole space, the starting points first;
- ``per-pcoder``: one experiment per pcoder (the others at ``search.defaults``), then the winners
  combined and scored once (``combination.json``);
- ``single-pcoder-grid``: every point of a grid per pcoder, the others feedforward
  (:mod:`pctune.search.grid`); no combination.

The driver (:mod:`pctune.search.driver`) gives a strategy a :class:`StageRunner`: how to run one
experiment, score points as plain tasks and find a stage's best; the strategy decides which. Nothing
outside this module compares a strategy's name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pctune.errors import PctuneError
from pctune.pc.hyperparameters import Hyperparameters
from pctune.schema import error
from pctune.search.grid import GRID_STRATEGY, check_grid_search, make_grid_searcher, pcoder_grids

COMBINATION_NAME = "combination"


class StageRunner(Protocol):
    """What the driver offers a strategy (:class:`pctune.search.driver.Stages`)."""

    prep: Any  # the Prepared search

    def run_stage(self, stage: str, searcher: Callable[[], Any], num_samples: int) -> None: ...

    def evaluate(self, points: dict[str, Hyperparameters]) -> dict[str, dict]: ...

    def best(self, stage: str): ...

    def read_combination(self) -> dict | None: ...

    def write_combination(self, result: dict) -> None: ...

    def log(self, message: str) -> None: ...

    def scores(self, metrics: dict) -> str: ...


@dataclass(frozen=True)
class Strategy:
    """One ``search.strategy``; the subclasses below are the three there are."""

    name: str
    description: str
    per_pcoder: bool = False  # one Tune experiment per pcoder ("pcoder1", ...), else one ("joint")
    uses_num_samples: bool = True  # search.num_samples trials per experiment (else: the grid decides)
    exhaustive: bool = False  # scores every planned point on every image: no scheduler that stops trials early
    combines: bool = False  # ends by scoring the stages' winners together (combination.json)

    # -- the job ------------------------------------------------------------------------------------------
    def check_search(self, cfg, table: Mapping, source: str) -> None:
        """``[search]`` keys that only make sense with another strategy."""
        if cfg.grid is not None:
            raise error(source, "search.grid", f"only with strategy = '{GRID}'")

    def check(self, job, kinds, source: str) -> None:
        """What it cannot work with besides ``[search]`` (:meth:`check_search`): nothing, so far."""

    # -- the plan -----------------------------------------------------------------------------------------
    def prepare(self, job, net, space) -> list:
        """Checks against the model and the space; the grids of a sweep (else none)."""
        return []

    def starts_from_points(self) -> bool:
        """Whether the job's starting points are tried first."""
        return True

    def expected_trials(self, num_samples: int, num_pcoders: int, grids: list) -> int:
        return num_samples * (num_pcoders if self.per_pcoder else 1)

    def plan(self, search, grids: list) -> str:
        per = " per pcoder" if self.per_pcoder else ""
        return f"{self.name}, sampler {search.sampler}, {search.num_samples} trials{per}"

    def run(self, stages: StageRunner) -> None:
        raise NotImplementedError


class Joint(Strategy):
    def run(self, stages: StageRunner, stage: str = "joint") -> None:
        """One Tune experiment over the whole space, starting points first (``stage``: the benchmarks run
        it under their own names)."""
        from pctune.search.searchers import make_searcher

        prep = stages.prep
        stages.run_stage(stage, functools.partial(make_searcher, prep.job, prep.space, prep.starting_points),
                         prep.job.search.num_samples)


class PerPcoder(Strategy):
    def prepare(self, job, net, space) -> list:
        net.hyperparameters(job.search.defaults)  # the preset must exist
        if space.shared:
            raise PctuneError(f"{job.source}: search.strategy = '{self.name}' needs a space with shared = false "
                              f"({job.space_path})")
        return []

    def run(self, stages: StageRunner) -> None:
        from pctune.search.searchers import make_searcher, pcoder_points

        prep = stages.prep
        defaults = prep.net.hyperparameters(prep.job.search.defaults)
        winners = []
        for n in range(1, prep.space.num_pcoders + 1):
            space = prep.space.only(n, defaults)
            points = pcoder_points(prep.starting_points, space, defaults, n)
            stage = f"pcoder{n}"
            stages.run_stage(stage, functools.partial(make_searcher, prep.job, space, points),
                             prep.job.search.num_samples)
            best = stages.best(stage)
            if best is None:
                raise PctuneError(f"[{stage}] no trial finished without diverging")
            winners.append(best.hparams.triples()[n - 1])
            b, lam, a = winners[-1]
            stages.log(f"[{stage}] winner beta={b:.4g} lambda={lam:.4g} alpha={a:.4g} ({stages.scores(best.metrics)})")
        self._combine(stages, Hyperparameters(*(list(col) for col in zip(*winners, strict=True))))

    @staticmethod
    def _combine(stages: StageRunner, combined: Hyperparameters) -> None:
        """Score the combined winners once (again only when the winners changed: an extended search)."""
        from pctune.search.space import hparams_to_config

        earlier = stages.read_combination()
        if earlier is None or earlier.get("config") != hparams_to_config(combined):
            result = stages.evaluate({COMBINATION_NAME: combined})[COMBINATION_NAME]
            stages.write_combination(result)
            stages.log(f"combination of the per-pcoder winners: {stages.scores(result['metrics'])}")


class SinglePcoderGrid(Strategy):
    def check_search(self, cfg, table: Mapping, source: str) -> None:
        from pctune.search.schedulers import SCHEDULERS

        check_grid_search(cfg, table, source)
        if SCHEDULERS[cfg.scheduler].stops_early:  # read before [search]'s other checks, as the grid's keys
            every = [name for name, kind in SCHEDULERS.items() if not kind.stops_early]
            raise error(source, "search.scheduler", f"strategy = '{self.name}' scores every grid point on every "
                        f"image: use {every[0]!r}")

    def prepare(self, job, net, space) -> list:
        return pcoder_grids(space, job.search.grid, f"{job.source}: search.grid")

    def starts_from_points(self) -> bool:
        return False  # a grid sweep runs its grid only

    def expected_trials(self, num_samples: int, num_pcoders: int, grids: list) -> int:
        return sum(len(g.points) for g in grids)

    def plan(self, search, grids: list) -> str:
        sizes = "+".join(str(len(g.points)) for g in grids)
        return f"{self.name}, {sizes} trials: a grid per pcoder, the others feedforward"

    def run(self, stages: StageRunner) -> None:
        """One exhaustive Tune experiment per pcoder over its grid: each trial is one point of the sweep."""
        for grid in stages.prep.grids:
            stages.log(f"[{grid.stage}] {grid.describe()}")
            stages.run_stage(grid.stage, functools.partial(make_grid_searcher, stages.prep.job, grid),
                             len(grid.points))


GRID = GRID_STRATEGY
#: strategy name -> its record; in the order the documentation and errors list them
STRATEGIES: dict[str, Strategy] = {
    "joint": Joint("joint", "one Tune experiment over the whole space"),
    "per-pcoder": PerPcoder("per-pcoder", "one experiment per pcoder, the others at search.defaults; winners "
                            "combined", per_pcoder=True, combines=True),
    GRID: SinglePcoderGrid(GRID, "every point of a (beta, lambda) grid per pcoder, the others feedforward",
                           per_pcoder=True, uses_num_samples=False, exhaustive=True),
}


def strategy(name: str | None) -> Strategy:
    """The record of ``name`` as a job.json records it (an older pctune's may not say: joint); a name
    this pctune does not know is a one-line error, not a guess."""
    if name and name not in STRATEGIES:
        raise PctuneError(f"job.json names the strategy {name!r}, which this pctune does not know "
                          f"({', '.join(STRATEGIES)})")
    return STRATEGIES[name or "joint"]
