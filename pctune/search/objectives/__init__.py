"""The search objectives: THE table of ``objective.kind`` values, :data:`OBJECTIVES`.

Each entry is a subclass of :class:`Objective` (the contract: :mod:`pctune.search.objectives.base`);
:func:`parse_objective` reads a job's ``[objective]`` into one, once, at load time
(``job.kinds.objective``). Registering a new kind of trial is one entry here (or, from outside pctune,
``OBJECTIVES["name"] = MyObjective``); nothing else in pctune compares ``objective.kind``.
"""

from __future__ import annotations

from pctune.schema import error
from pctune.search.objectives.base import Objective, TrialContext
from pctune.search.objectives.cam_iou import CAM_TIMESTEPS, CamIou
from pctune.search.objectives.cross_entropy import CrossEntropy
from pctune.search.objectives.robust import RobustCrossEntropy

#: ``objective.kind`` -> the objective's class; in the order the documentation and errors list them
OBJECTIVES: dict[str, type[Objective]] = {
    "cross_entropy": CrossEntropy,  # with [[objective.conditions]]: RobustCrossEntropy
    "cam_iou": CamIou,
}


def parse_objective(job, source: str) -> Objective:
    """The typed objective of ``job`` (one-line errors name the file and key)."""
    kind = job.objective.kind
    if kind not in OBJECTIVES:
        raise error(source, "objective.kind", f"unknown kind {kind!r} ({', '.join(OBJECTIVES)})")
    return OBJECTIVES[kind].from_job(job, source)


__all__ = ["CAM_TIMESTEPS", "OBJECTIVES", "CamIou", "CrossEntropy", "Objective", "RobustCrossEntropy", "TrialContext",
           "parse_objective"]
