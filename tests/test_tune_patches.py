"""pctune.search.tune_patches on real Ray Tune experiments: trials take Ray's prestarted workers, and
Tune's state is saved in the steps a resume needs and in no other. (That a resume after a killed
driver still loses no finished trial and runs none twice is test_signed_state's and test_run_identity's.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import idle_ray_workers, wait_for_idle_workers
from ray import tune

pytestmark = pytest.mark.slow


class Steps(tune.Callback):
    """Per step: the trials' fingerprint, whether Tune's staging state file changed, and every trial's pid."""

    def __init__(self) -> None:
        self.steps: list[tuple[tuple, bool]] = []
        self.pids: set[int] = set()
        self._last: tuple | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.pids.add(int(result["pid"]))

    def on_step_end(self, iteration, trials, **info):
        from pctune.search.tune_patches import trials_fingerprint

        if not trials:
            return
        staging = Path(trials[0].storage.experiment_driver_staging_path)
        state = sorted(staging.glob("experiment_state-*.json"))
        stamp = (state[-1].name, state[-1].stat().st_mtime_ns, state[-1].stat().st_size) if state else None
        self.steps.append((trials_fingerprint(trials), stamp != self._last))
        self._last = stamp


def _experiment(tmp_path: Path, stage: str, trials: int) -> tuple[Steps, set[int]]:
    from pctune.search import driver
    from pctune.search.job import load_job
    from pctune.search.prepare import prepare

    job = load_job("demo", {"run.storage_path": str(tmp_path), "search.num_samples": trials,
                            "search.starting_points": [], "data.num_images": 60,
                            "search.max_concurrent_trials": 1})
    prep = prepare(job, log=lambda _m: None)
    setup = driver.trial_setup(prep)
    steps = Steps()
    wait_for_idle_workers()
    idle = idle_ray_workers()
    driver.run_joint(prep, setup, log=lambda _m: None, callbacks=[steps], stage=stage)
    return steps, idle


def test_trials_take_the_idle_workers_ray_prestarted(cluster, tmp_path, monkeypatch):
    from pctune.search import tune_patches

    with monkeypatch.context() as m:  # Tune's own runtime environment kept: a new worker for the trials
        m.setattr(tune_patches, "_UNNEEDED_ENV", ())
        steps, idle = _experiment(tmp_path, "kept_env", 2)
        assert idle and len(steps.pids) == 1 and not steps.pids & idle
    steps, idle = _experiment(tmp_path, "lean", 2)
    assert idle and len(steps.pids) == 1 and steps.pids <= idle  # one of the workers that were waiting


def test_the_state_is_saved_in_the_steps_that_add_a_trial_and_no_other(cluster, tmp_path):
    steps, _ = _experiment(tmp_path, "saves", 4)
    changed = [i for i, (seen, _) in enumerate(steps.steps) if i == 0 or seen != steps.steps[i - 1][0]]
    saved = [i for i, (_, wrote) in enumerate(steps.steps) if wrote]
    assert len({seen[-1][0] for seen, _ in steps.steps}) == 4  # four trials were added
    assert saved == changed  # a save in every step that added a trial, none in another step
    assert len(steps.steps) > 2 * len(saved)  # Tune's loop took many more steps than that

