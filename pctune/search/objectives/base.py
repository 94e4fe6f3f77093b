"""The contract of a search objective: what a kind of trial is, in one class (docs/architecture.md,
"The trial interface").

An :class:`Objective` is parsed once from the job's ``[objective]`` table (:meth:`Objective.from_job`)
and then owns everything that differs between kinds of trials:

- on the driver, once per search: the arrays every trial is scored on (:meth:`arrays`: images,
  labels, perhaps masks or one image set per condition), put into Ray's object store;
- in the trial (a Ray worker): how it scores its configuration (:meth:`scores`): a stream of result
  dicts, one per report point (the fidelity: images seen, ``num_images``), the last one ``final``;
- the metric it optimizes and its direction (:attr:`metric`, :attr:`mode`), what the Tune searcher
  gets (:meth:`targets`: several metrics for a Pareto search), its constraint values, and the metric
  names of its own that tracking logs (:meth:`reported`);
- which schedulers and samplers it works with (:meth:`check`, called by the one validator,
  :func:`pctune.search.kinds.check_compatible`), and how people are told what it measures
  (:meth:`describe`, :meth:`rule`).

The ranking, the leaderboard, best.toml, MLflow and the champion follow :attr:`metric` and
:attr:`mode` through job.json; nothing else in pctune branches on the kind. A new objective is one
subclass and one entry in :data:`pctune.search.objectives.OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from pctune.metrics import METRIC, MODE
from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet
from pctune.schema import error

#: ``stream(images_key, timesteps, sums)``: the running cross-entropy scores of the trial's configuration
#: on ``data[images_key]`` (:func:`pctune.search.objective.score_chunks`, with the worker's caches)
Stream = Callable[..., Iterator[dict[str, float]]]


@dataclass
class TrialContext:
    """What a trial's :meth:`Objective.scores` works with, in the worker process."""

    net: PredictiveNet
    data: dict[str, torch.Tensor]  # the arrays of :meth:`Objective.arrays`, on the trial's device
    hparams: Hyperparameters
    penalty: float  # the score of a diverged configuration
    stream: Stream


@dataclass(frozen=True)
class Objective:
    """One kind of trial (see the module docstring); subclasses are frozen dataclasses (they travel to
    the workers in the trial payload)."""

    kind: ClassVar[str] = ""
    takes: ClassVar[tuple[str, ...]] = ()  # the optional [objective] tables it reads: "conditions", "cam"
    metric: ClassVar[str] = METRIC  # THE metric a search of it optimizes
    mode: ClassVar[str] = MODE  # "min" | "max"
    timesteps: int = 4
    batch_size: int = 100

    # -- the job side -------------------------------------------------------------------------------
    @classmethod
    def from_job(cls, job, source: str) -> Objective:
        """The objective of ``job``'s ``[objective]`` table (its keys read and range-checked already)."""
        cls.refuse_tables(job, source)
        return cls(timesteps=job.objective.timesteps, batch_size=job.objective.batch_size)

    @classmethod
    def refuse_tables(cls, job, source: str) -> None:
        """A one-line error for an optional ``[objective]`` table this kind does not read."""
        if job.objective.conditions and "conditions" not in cls.takes:
            raise error(source, "objective.conditions", f"objective.kind = {cls.kind!r} scores one condition "
                        "(objective.sigma); robust conditions, constraints and Pareto searches take objective.kind = "
                        "'cross_entropy'")
        if job.objective.cam and "cam" not in cls.takes:
            raise error(source, "objective.cam", "only with objective.kind = 'cam_iou' (how its Grad-CAM IoU is "
                        "measured)")

    def check(self, job, kinds, source: str) -> None:
        """Refuse, with a one-line error naming the file and key, what this objective cannot work
        with: ``kinds`` are the job's other records (scheduler, sampler, strategy, data source)."""
        if kinds.scheduler.stops_early and not self.allows_early_stopping():
            raise error(source, "search.scheduler", f"objective.kind = {self.kind!r} needs 'fifo' (its score is "
                        "measured once, on every image)")

    def allows_early_stopping(self) -> bool:
        """Whether a running score over the images seen so far ranks trials fairly (asha, hyperband)."""
        return True

    def targets(self) -> tuple[str | list[str], str | list[str]]:
        """The metric(s) and mode(s) the Tune searcher gets."""
        return self.metric, self.mode

    def constraint_keys(self) -> tuple[str, ...]:
        """Result keys of constraint values (<= 0: met) the sampler learns from."""
        return ()

    def front(self) -> list[str]:
        """A Pareto search's objectives (the ranking puts their front first); none by default."""
        return []

    def reported(self) -> tuple[str, ...]:
        """Metric names of its own (outside the families of :mod:`pctune.metrics`) that tracking logs."""
        return (self.metric,)

    def describe(self) -> str:
        """What the score is, for best.toml: ``<what>; lower is better``."""
        return f"{self.metric}; {'lower' if self.mode == 'min' else 'higher'} is better"

    def columns(self) -> tuple[str, ...]:
        """The leaderboard's and summary's columns of its own, first (``mean_ce`` is always shown)."""
        return () if self.metric == METRIC else (self.metric,)

    def at_t0(self) -> str | None:
        """The name of its metric at timestep 0 (the feedforward pass), if it has one: a sweep's heatmaps
        show the metric relative to it."""
        return None

    def relative_label(self) -> str:
        """What metric / metric at t = 0 is, in the sweep's terms."""
        return f"{self.metric} / {self.at_t0()}"

    def tradeoff_axes(self) -> tuple[str, str] | None:
        """Two metrics whose trade-off MLflow shows on the search's parent run (None: no such plot)."""
        return None

    def rule(self) -> str | None:
        """The champion rule when it is more than "best score" (a MLflow model version tag)."""
        return None

    def identity(self, job) -> dict[str, Any]:
        """Settings outside ``[objective]`` that change what a score means (the search's fingerprint)."""
        return {}

    # -- the driver side ------------------------------------------------------------------------------
    def arrays(self, job, spec, net: PredictiveNet, log, unreadable: list[str]) -> dict[str, np.ndarray]:
        """The arrays every trial is scored on, in the evaluation order: at least ``labels``."""
        raise NotImplementedError

    # -- the trial side -----------------------------------------------------------------------------------
    def scores(self, trial: TrialContext, sums=None) -> Iterator[dict[str, float]]:
        """The trial's results at its report points (``sums``: running sums to resume from)."""
        raise NotImplementedError
