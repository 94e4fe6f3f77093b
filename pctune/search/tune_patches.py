"""The two changes pctune makes to how Ray Tune runs an experiment, each measured
(docs/performance.md, "Where a trial's fixed cost goes"), each scoped to pctune's own ``Tuner.fit``.

1. **Save the state when a resume needs it** (:func:`saves_on_change`). The driver asks Tune to save
   its experiment state after every step (``TUNE_GLOBAL_CHECKPOINT_S=0``), so a resume after a killed
   driver loses nothing. But Tune's loop takes a step every 0.1 s while a trial evaluates, and each
   save (and its signed snapshot) took about 16 ms of the driver's time on the demo, three of them on
   the path from one trial's end to the next one's start. What a resume needs from the state is every
   trial the searcher proposed (its config, and the searcher's state after proposing it) and every
   paused trial (its checkpoint). A trial that ends after the last save is restored as running, and
   Tune reruns it under its own id, which replays its recorded result instead of evaluating again
   (:func:`pctune.search.trials.read_result_log`, ``TrialPayload.replay``); one killed while running
   reruns as it always did. So a step saves only when the searcher added a trial or a trial was paused
   or resumed (or when Tune forces a save: at the end, on a stop): about one save a trial.
2. **Prestarted workers for trials** (:func:`prestarted_workers`). Tune gives every trial actor the
   runtime environment ``{"env_vars": {"PL_DISABLE_FORK": "1"}}`` (for PyTorch Lightning, which pctune
   does not use). Ray hands an actor only an idle worker started with the same runtime environment,
   and the workers Ray prestarts have none, so every experiment waited for a new Python worker
   (1 to 3 s on 2 cores) although idle ones were there. Without that variable a trial takes one.

Both rely on Ray internals (``TuneController.checkpoint``, ``class_cache.DEFAULT_ENV_VARS``), checked
against the Ray versions of :data:`pctune.search.tune_state.TESTED_RAY`; where they are missing Tune
runs as it would without pctune (every step saved, a new worker per experiment)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

#: environment variables Tune sets on trial actors that pctune's trials do not need
_UNNEEDED_ENV = ("PL_DISABLE_FORK",)


def trials_fingerprint(trials: Sequence) -> tuple:
    """What a resume needs a save of Tune's state to have recorded: the trials (by id) and which are paused.
    (Results, starts and ends are not in it: a trial that ended since the last save is replayed.)"""
    return tuple((t.trial_id, t.status == "PAUSED") for t in trials)


@contextlib.contextmanager
def saves_on_change() -> Iterator[None]:
    """Within: Tune's controller saves its state only in steps that changed :func:`trials_fingerprint`."""
    try:
        from ray.tune.execution.tune_controller import TuneController
    except ImportError:  # another Ray: its own saving
        yield
        return
    original = TuneController.checkpoint

    def checkpoint(self, force: bool = False, wait: bool = False):
        trials = getattr(self, "_trials", None)
        if trials is None:  # a controller that keeps its trials elsewhere: every save, as Tune does
            return original(self, force=force, wait=wait)
        seen = trials_fingerprint(trials)
        if not (force or wait) and seen == getattr(self, "_pctune_saved", None):
            return None
        result = original(self, force=force, wait=wait)
        self._pctune_saved = seen
        return result

    TuneController.checkpoint = checkpoint
    try:
        yield
    finally:
        TuneController.checkpoint = original


@contextlib.contextmanager
def prestarted_workers() -> Iterator[None]:
    """Within: trial actors get no runtime environment of Tune's own, so they can take Ray's idle workers."""
    try:
        from ray.tune.execution import class_cache
        defaults = class_cache.DEFAULT_ENV_VARS
    except (ImportError, AttributeError):
        yield
        return
    removed = {name: defaults.pop(name) for name in _UNNEEDED_ENV if name in defaults}
    try:
        yield
    finally:
        defaults.update(removed)


@contextlib.contextmanager
def lean_fit() -> Iterator[None]:
    """Both changes, around one ``Tuner.fit``."""
    with saves_on_change(), prestarted_workers():
        yield
