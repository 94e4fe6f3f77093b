"""Where a search's work runs on a local Ray: its reference points in the driver, so that its first
trial takes one of the workers Ray prestarted (:func:`pctune.search.driver.points_in_driver`), and
with ``PCTUNE_PRELOAD=1`` those workers start with the trial's modules imported
(:func:`pctune.search.raycluster.connect`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import idle_ray_workers, wait_for_idle_workers
from ray import tune

pytestmark = pytest.mark.slow


class TrialPids(tune.Callback):
    def __init__(self) -> None:
        self.pids: set[int] = set()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.pids.add(int(result["pid"]))


def test_a_search_scores_its_references_without_taking_the_workers_its_trials_need(cluster, tmp_path):
    """The reference points of a local CPU search are scored in the driver: as Ray tasks they took the
    idle workers (a worker that ran a task is never given to an actor) and the first trial waited for a
    new one."""
    from pctune.search import driver
    from pctune.search.job import load_job
    from pctune.search.rundir import RunDir

    job = load_job("demo", {"run.storage_path": str(tmp_path), "search.num_samples": 2,
                            "search.starting_points": [], "data.num_images": 60, "search.max_concurrent_trials": 1})
    steps = TrialPids()
    wait_for_idle_workers()
    idle = idle_ray_workers()
    driver.run_search(job, log=lambda _m: None, callbacks=[steps])
    assert "feedforward" in RunDir(job.run_dir).references()
    assert idle and len(steps.pids) == 1 and steps.pids <= idle


_WORKERS_WITH_TORCH = """
import time
from pathlib import Path
import ray
from pctune.search.raycluster import connect
connect(None, log=lambda _m: None)
raylet = str(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)

def ours(proc):  # an idle worker of this Ray: its parent is this Ray's raylet
    try:
        return (proc / "cmdline").read_bytes().startswith(b"ray::IDLE") and (
            (proc / "stat").read_text().rsplit(")", 1)[1].split()[1] == raylet)
    except OSError:
        return False

deadline, seen = time.monotonic() + 60, None
while time.monotonic() < deadline:
    idle = [p for p in Path("/proc").iterdir() if p.name.isdigit() and ours(p)]
    with_torch = [p for p in idle if "libtorch_cpu" in (p / "maps").read_text()]
    seen = seen or (idle and time.monotonic())
    if idle and (len(with_torch) == len(idle) or time.monotonic() > seen + 8):  # torch takes about 3 s
        break
    time.sleep(0.5)
print(len(idle), len(with_torch))
"""


@pytest.mark.parametrize("preload", ["1", "0"])
def test_a_local_ray_starts_its_workers_with_the_trial_modules_imported(preload, tmp_path):
    env = {**os.environ, "PCTUNE_PRELOAD": preload, "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-c", _WORKERS_WITH_TORCH], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    idle, with_torch = int(out[-2]), int(out[-1])
    assert idle >= 1
    assert with_torch == (idle if preload == "1" else 0)
