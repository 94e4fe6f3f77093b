"""``objective.kind = "cross_entropy"`` without conditions: the paper's objective (``shared/spec/dynamics.md``).

Every trial scores the same fixed images with Gaussian noise at ``objective.sigma`` (normalized space,
drawn once from the noise seed); the score is the cross-entropy averaged over the images and over
t = 1..T, minimized (:func:`pctune.search.objective.score_chunks`). A running mean over the images
seen so far ranks trials fairly, so any scheduler may stop them early.
"""

from __future__ import annotations

from dataclasses import dataclass

from pctune.metrics import at_timestep
from pctune.search.objectives.base import Objective


@dataclass(frozen=True)
class CrossEntropy(Objective):
    kind = "cross_entropy"
    takes = ("conditions",)

    @classmethod
    def from_job(cls, job, source: str) -> Objective:
        """The paper's objective, or with ``[[objective.conditions]]`` a robust one."""
        if job.objective.conditions:
            from pctune.search.objectives.robust import RobustCrossEntropy

            return RobustCrossEntropy.from_job(job, source)
        cls.refuse_tables(job, source)
        return cls(timesteps=job.objective.timesteps, batch_size=job.objective.batch_size)

    def describe(self) -> str:
        return "mean cross-entropy over t = 1..T on the noisy subset; lower is better"

    def at_t0(self) -> str:
        return at_timestep("ce", 0)

    def relative_label(self) -> str:
        return "mean CE(1..T) / CE(0)"

    def reported(self) -> tuple[str, ...]:
        return ()  # mean_ce and its family are pctune.metrics' own

    def arrays(self, job, spec, net, log, unreadable):
        from pctune.search.images import evaluation_order, noisy_images

        images, labels = evaluation_order(*noisy_images(job, spec, unreadable), job.data.seed)
        return {"images": images, "labels": labels}

    def scores(self, trial, sums=None):
        return trial.stream("images", self.timesteps, sums)
