"""``objective.kind = "cross_entropy"`` with ``[[objective.conditions]]``: a robust objective.

Several perturbations of the same images scored in one trial and combined (the conditions, their
combination rule and constraints are :mod:`pctune.search.conditions`): a weighted mean of the
conditions' mean cross-entropies, optionally under constraints, or a Pareto search over two or three
of them. The trial advances every condition's stream to the same report point (:func:`lockstep`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pctune.metrics import METRIC, at_timestep, of_condition
from pctune.schema import error
from pctune.search.conditions import RobustObjective, lockstep
from pctune.search.objectives.base import Objective


@dataclass(frozen=True)
class RobustCrossEntropy(Objective):
    kind = "cross_entropy"
    takes = ("conditions",)
    robust: RobustObjective | None = None

    @classmethod
    def from_job(cls, job, source: str) -> RobustCrossEntropy:
        cls.refuse_tables(job, source)
        return cls(timesteps=job.objective.timesteps, batch_size=job.objective.batch_size,
                   robust=job.objective.robust(source))

    @property
    def pareto(self) -> bool:
        return len(self.robust.objectives) > 1

    def check(self, job, kinds, source: str) -> None:
        """Pareto needs every trial scored on every image (schedulers rank one metric) and a sampler that
        handles several objectives; constraints need a sampler that takes them; a scheduler that pauses
        trials checkpoints one condition's running sums."""
        scheduler, sampler = kinds.scheduler, kinds.sampler
        if scheduler.pauses_trials:
            instead = reversed(kinds.schedulers_without("pauses_trials"))  # the nearest first: 'asha' or 'fifo'
            raise error(source, "search.scheduler", f"{scheduler.name!r} works with a single condition; use "
                        f"{' or '.join(repr(s) for s in instead)}")
        if self.pareto and scheduler.stops_early:
            raise error(source, "search.scheduler", f"combine = 'pareto' needs "
                        f"{kinds.schedulers_without('stops_early')[0]!r} (early stopping ranks one metric)")
        if self.pareto and not sampler.multi_objective:
            raise error(source, "search.sampler", f"combine = 'pareto' needs one of "
                        f"{', '.join(kinds.samplers_with('multi_objective'))}")
        if self.robust.constraints and not sampler.constraints:
            raise error(source, "search.sampler",
                        f"constraints need one of {', '.join(kinds.samplers_with('constraints'))}")

    def targets(self):
        if self.pareto:
            return self.robust.objectives, ["min"] * len(self.robust.objectives)
        return self.metric, self.mode

    def constraint_keys(self) -> tuple[str, ...]:
        return tuple(self.robust.constraint_keys)

    def front(self) -> list[str]:
        return list(self.robust.objectives) if self.pareto else []

    def at_t0(self) -> str:
        return at_timestep("ce", 0)

    def relative_label(self) -> str:
        return "mean CE(1..T) / CE(0)"

    def reported(self) -> tuple[str, ...]:
        return ()  # every name it reports is a family of pctune.metrics

    def describe(self) -> str:
        return f"chosen by the rule: {self.rule()}"

    def rule(self) -> str:
        return self.robust.champion_rule()

    def condition_names(self) -> list[str]:
        return [c.name for c in self.robust.conditions]

    def tradeoff_axes(self) -> tuple[str, str] | None:
        """The two mean CEs the trade-off plot shows (the Pareto ones, else the first two conditions)."""
        names = self.robust.pareto[:2] if self.robust.pareto else self.condition_names()[:2]
        return (of_condition(METRIC, names[0]), of_condition(METRIC, names[1])) if len(names) == 2 else None

    def arrays(self, job, spec, net, log, unreadable):
        from pctune.search.conditions import condition_images
        from pctune.search.images import checked_subset, evaluation_order, noise_seed

        clean, labels = checked_subset(job, spec, unreadable)
        mean, std = _normalization(job)
        arrays = {}
        for cond in self.robust.conditions:  # one seeded order: the same for every condition
            images = condition_images(cond, clean.float(), mean, std, noise_seed(job)).contiguous().numpy()
            arrays[f"images/{cond.name}"], ordered = evaluation_order(images, labels.long().numpy(), job.data.seed)
        return {"labels": ordered, **arrays}

    def scores(self, trial, sums=None):
        return lockstep(self.robust, {c.name: trial.stream(f"images/{c.name}", c.timesteps)
                                      for c in self.robust.conditions}, trial.penalty)


def _normalization(job) -> tuple[list[float], list[float]]:
    from pctune.data.sources import data_source

    return data_source(job.data.source).normalization()
