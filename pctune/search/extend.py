"""Restoring a Tune experiment with more trials than it was started with (``--resume --num-samples N``).

Ray Tune 2.60 keeps an experiment's trial count in its search generator's state, not in the restored
``TuneConfig``: ``Tuner.restore`` reads ``tuner.pkl`` (whose ``TuneConfig.num_samples`` is never used
again on resume: ``TunerInternal._fit_resume`` passes no ``num_samples`` to ``tune.run``), ``tune.run``
wraps the restored searcher in a ``ConcurrencyLimiter`` and a ``SearchGenerator``, and
``TuneController.resume`` restores the generator from ``search_gen_state-*.json`` (its ``counter`` of
trials created and its ``total_samples``), after the wrapped searcher (the Optuna study,
``searcher-state-*.pkl``). New trials are created while ``counter < total_samples``.

So the extension happens in memory, in one place (:func:`restore_tuner`): the restored ``TuneConfig``
gets the same searcher wrapped the way ``tune.run`` would wrap it, in a generator whose ``set_state``
raises the restored ``total_samples`` to the new count. The restored study then proposes the extra
trials (the search continues; trials already created are never created again), and Tune saves the new
total with its state as it runs. No pickled file (``tuner.pkl``, the searcher's or the generator's
state) is rewritten by pctune.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator

from pctune.search.callbacks import Progress


class ExtendingSearchGenerator(SearchGenerator):
    """Tune's ``SearchGenerator``, restored with at least ``num_samples`` trials in total."""

    def __init__(self, searcher: Searcher, num_samples: int) -> None:
        super().__init__(searcher)
        self.extend_to = int(num_samples)

    def set_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if int(state.get("total_samples", 0)) < self.extend_to:
            # "finished" is set when an experiment was stopped: more trials are wanted now.
            state.update(total_samples=self.extend_to, finished=False)
        super().set_state(state)


class _Limiter(ConcurrencyLimiter):
    """Tune's ``ConcurrencyLimiter`` whose restored state keeps the limit it was made with (the job's
    ``--max-concurrent`` now, not the one saved with the experiment)."""

    def set_state(self, state: dict[str, Any]) -> None:
        limit = self.max_concurrent
        super().set_state(state)
        self.max_concurrent = limit


def restore_tuner(exp_dir: Path, trainable, num_samples: int, max_concurrent: int | None = None) -> tune.Tuner:
    """``Tuner.restore`` of ``exp_dir`` (unfinished trials resumed, errored ones kept), running until
    ``num_samples`` trials exist: more than the experiment was started with extends it; at most
    ``max_concurrent`` at a time (None: the limit it was started with)."""
    tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=False)
    internal = getattr(tuner, "_local_tuner", None)  # None under Ray Client: Tune's own count stands
    if internal is None:
        return tuner
    config = internal._tune_config
    searcher = config.search_alg
    if isinstance(searcher, Searcher):
        if config.max_concurrent_trials:  # as tune.run wraps it, so that the saved wrapper state fits
            searcher = _Limiter(searcher, max_concurrent=max_concurrent or config.max_concurrent_trials)
        config.search_alg = ExtendingSearchGenerator(searcher, num_samples)
        config.max_concurrent_trials = None
        config.num_samples = max(config.num_samples, num_samples)
    for callback in internal._run_config.callbacks or []:
        if isinstance(callback, Progress):
            callback.total = max(callback.total, num_samples)
    return tuner
