"""A job's variants as typed records, parsed once, and THE validator of how they combine.

``job.kinds`` (:class:`Kinds`) holds the job's objective (:mod:`pctune.search.objectives`), strategy
(:mod:`pctune.search.strategies`), scheduler (:mod:`pctune.search.schedulers`), sampler
(:mod:`pctune.search.samplers`) and data source (:mod:`pctune.data.sources`), each looked up in its
owner's table. :func:`check_compatible` asks each record what it cannot work with; every refusal is a
one-line error naming the file and the key. Code after validation reads the records' fields and
methods, never the names.
"""

from __future__ import annotations

from dataclasses import dataclass

from pctune.data.sources import DATA_SOURCES, DataSource
from pctune.schema import error
from pctune.search.objectives import Objective, parse_objective
from pctune.search.samplers import SAMPLERS, SamplerKind
from pctune.search.schedulers import SCHEDULERS, SchedulerKind
from pctune.search.strategies import STRATEGIES, Strategy


@dataclass(frozen=True)
class Kinds:
    objective: Objective
    strategy: Strategy
    scheduler: SchedulerKind
    sampler: SamplerKind
    data: DataSource

    @staticmethod
    def schedulers_without(flag: str) -> list[str]:
        """The schedulers whose ``flag`` (``stops_early``, ``pauses_trials``) is false: what to use instead."""
        return [name for name, kind in SCHEDULERS.items() if not getattr(kind, flag)]

    @staticmethod
    def samplers_with(flag: str) -> list[str]:
        """The samplers whose ``flag`` (``constraints``, ``multi_objective``) is true."""
        return [name for name, kind in SAMPLERS.items() if getattr(kind, flag)]


def read_kinds(job, source: str) -> Kinds:
    """The records of ``job``'s names (each name was checked against its table when its table was read)."""
    return Kinds(parse_objective(job, source), STRATEGIES[job.search.strategy], SCHEDULERS[job.search.scheduler],
                 SAMPLERS[job.search.sampler], DATA_SOURCES[job.data.source])


def check_compatible(job, source: str) -> None:
    """Refuse a job whose parts do not work together (one line naming the file and the key)."""
    data = DATA_SOURCES[job.data.source]
    if not data.reads_folder and job.data.path:
        raise error(source, "data.path", f"the {data.name} source has its own images and reads no folder "
                    f"({job.data.path}); set data.source = \"imagenet-val\" to search on a folder")
    if data.reads_folder and not job.data.path:
        raise error(source, "data.path", "the ImageNet validation folder is required (or pass --data PATH)")
    kinds = job.kinds  # parses the objective
    kinds.objective.check(job, kinds, source)
    kinds.strategy.check(job, kinds, source)
