"""Ray Tune searchers of a search's experiments: Optuna over a space, with the job's seeded sampler
and its starting points first."""

from __future__ import annotations

from dataclasses import dataclass, field

from pctune.pc.hyperparameters import Hyperparameters
from pctune.search.samplers import make_sampler
from pctune.search.schedulers import FidelityOptunaSearch
from pctune.search.space import SearchSpace, SpaceSampler


@dataclass
class StartingPoint:
    """A point the searcher tries first: a preset or a table of the job, in the space's coordinates."""

    label: str
    hparams: Hyperparameters
    coords: dict[str, float]
    notes: list[str] = field(default_factory=list)


def make_searcher(job, space: SearchSpace, points: list):
    """Ray Tune's OptunaSearch over ``space`` with the job's seeded sampler, the starting points first
    (trials stopped early reach the study as PRUNED: :class:`FidelityOptunaSearch`). The objective's
    constraints reach the sampler's ``constraints_func``; a Pareto search has one objective per condition."""
    objective = job.kinds.objective
    sampler = make_sampler(job.search.sampler, job.search.seed, job.search.max_concurrent_trials, job.source)
    metric, mode = objective.targets()
    searcher = FidelityOptunaSearch(space=SpaceSampler(space), metric=metric, mode=mode, sampler=sampler,
                                    points_to_evaluate=[p.coords for p in points] or None)
    searcher.constraint_keys = objective.constraint_keys()
    return searcher


def pcoder_points(points: list, space: SearchSpace, defaults: Hyperparameters, n: int) -> list:
    """The starting points of pcoder ``n``'s experiment (per-pcoder): each point's pcoder ``n``, the others
    at ``defaults``, in the pcoder's ``space``; duplicates once."""
    out, seen = [], set()
    for point in points:
        mixed = [list(t) for t in defaults.triples()]
        mixed[n - 1] = list(point.hparams.triples()[n - 1])
        coords, _ = space.encode(Hyperparameters(*zip(*mixed, strict=True)), label=point.label)
        key = tuple(sorted((k, round(v, 12)) for k, v in coords.items()))
        if key not in seen:
            seen.add(key)
            out.append(StartingPoint(point.label, space.decode(coords), coords))
    return out
