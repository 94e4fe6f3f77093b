"""Per-trial overhead of the search service on the embedded demo.

Compares the wall time per trial of a real Ray Tune + Optuna search (``pctune search demo``'s code
path: the preparation, a new local Ray, the reference points, then the experiment; one trial at a
time, ``--repeats`` times, then ``--concurrency`` at a time) with the bare
evaluation of the same points in one process (``pctune.search.objective.score``, same thread count as a
trial), and splits each serial search's wall time into what the experiment pays once (its start and
end, the first trial's warm-up) and what every later trial pays besides its evaluation
(``decomposition``). The summary takes the medians of the repeats. Writes JSON:

    python benchmarks/search_overhead.py --trials 30 --out benchmarks/results/search_overhead.json

The driver lets Tune save its state in any step (``TUNE_GLOBAL_CHECKPOINT_S=0``) and
:mod:`pctune.search.tune_patches` keeps the steps a resume needs; ``TUNE_GLOBAL_CHECKPOINT_S=30 python
benchmarks/search_overhead.py ...`` measures Tune's interval instead (the JSON records the variable).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from ray import tune


class Timeline(tune.Callback):
    """When each trial started, reported and ended, on the driver's clock (``time.perf_counter``)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float, float | None]] = []

    def on_trial_start(self, iteration, trials, trial, **info):
        self.events.append(("start", trial.trial_id, time.perf_counter(), None))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.events.append(("complete", trial.trial_id, time.perf_counter(),
                            (trial.last_result or {}).get("eval_seconds")))


def _decompose(timeline: Timeline, begin: float, end: float) -> dict:
    """Where a serial search's wall time goes besides the evaluations: the experiment's start (the trial
    actor's process, imports, Tune's setup) before the first trial, the first trial's own extra (the model
    built in the worker, the first evaluation's warm-up), the steady cost of each later trial (from one
    trial's end to the next one's start on the driver, plus the trial's time beyond its evaluation) and
    the experiment's end."""
    starts = {tid: t for kind, tid, t, _ in timeline.events if kind == "start"}
    ends = {tid: (t, ev) for kind, tid, t, ev in timeline.events if kind == "complete"}
    order = sorted(ends, key=lambda tid: starts[tid])
    between = [starts[b] - ends[a][0] for a, b in itertools.pairwise(order)]
    beyond_eval = [ends[tid][0] - starts[tid] - ends[tid][1] for tid in order]
    between_s, beyond_s = statistics.median(between), statistics.median(beyond_eval[1:])
    return {"experiment_start_s": starts[order[0]] - begin, "first_trial_beyond_eval_s": beyond_eval[0],
            "between_trials_median_s": between_s, "trial_beyond_eval_median_s": beyond_s,
            "steady_fixed_cost_per_trial_s": between_s + beyond_s, "experiment_end_s": end - ends[order[-1]][0]}


def _search(job, trials: int, concurrency: int, stage: str, references: str) -> dict:
    """One search as ``pctune search`` runs it: a new local Ray, the reference points scored (in the driver
    or as Ray tasks, ``references``), then the experiment, timed."""
    from pctune import localray
    from pctune.search import driver
    from pctune.search.prepare import prepare
    from pctune.search.rundir import load_trials

    job.search.num_samples = trials
    job.search.max_concurrent_trials = concurrency
    job.search.starting_points = []
    prep = prepare(job, log=lambda _m: None)
    driver.connect(None, log=lambda _m: None)  # after the preparation, as in pctune search
    setup = driver.trial_setup(prep)
    in_driver = driver.points_in_driver(job) if references == "auto" else references == "driver"
    driver.evaluate_points(setup, driver.reference_points(prep.net), job.search.resources, in_driver)
    timeline = Timeline()
    start = time.perf_counter()
    driver.run_joint(prep, setup, log=lambda _m: None, callbacks=[timeline], stage=stage)  # no starting points
    end = time.perf_counter()
    wall = end - start
    done = load_trials(job.run_dir / stage)
    evals = [t.metrics["eval_seconds"] for t in done]
    out = {"trials": len(done), "wall_s": wall, "wall_per_trial_s": wall / len(done),
           "in_trial_eval_mean_s": statistics.mean(evals), "model_loads_max": max(
               t.metrics["model_loads"] for t in done), "configs": [t.config for t in done], "prep": prep}
    if concurrency == 1:
        out["decomposition"] = _decompose(timeline, start, end)
    localray.shutdown()
    return out


def _bare(prep, configs: list[dict], threads: int) -> dict:
    import torch

    from pctune.search.objective import score
    from pctune.search.space import hparams_from_config

    torch.set_num_threads(threads)
    images, labels = torch.from_numpy(prep.images.copy()), torch.from_numpy(prep.labels.copy())
    net = prep.net
    cfg = prep.job.objective
    score(net, images, labels, net.hyperparameters("default"), timesteps=cfg.timesteps,
          batch_size=cfg.batch_size)  # warm-up
    times = []
    for config in configs:
        hp = hparams_from_config(config, net.num_pcoders)
        start = time.perf_counter()
        score(net, images, labels, hp, timesteps=cfg.timesteps, batch_size=cfg.batch_size)
        times.append(time.perf_counter() - start)
    return {"evals": len(times), "mean_s": statistics.mean(times), "median_s": statistics.median(times)}


def _machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    return {"cpus": os.cpu_count(), "cpu": model, "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]}


def _median_of(runs: list[dict], key: str, within: str | None = None) -> float:
    return statistics.median((r[within] if within else r)[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="serial searches; the summary takes their medians")
    parser.add_argument("--concurrency", type=int, default=2, help="last run: trials at a time")
    parser.add_argument("--references", choices=["auto", "driver", "tasks"], default="auto",
                        help="where the reference points are scored before each experiment (auto: as pctune search "
                             "does; tasks: as Ray tasks, pctune before 2026-12-07)")
    parser.add_argument("--out", default="benchmarks/results/search_overhead.json")
    args = parser.parse_args()

    from pctune.search.job import load_job

    machine_before = _machine()
    with tempfile.TemporaryDirectory() as tmp:
        job = load_job("demo", {"run.storage_path": tmp})
        serial = [_search(job, args.trials, 1, f"bench_serial{i}", args.references) for i in range(args.repeats)]
        parallel = _search(job, args.trials, args.concurrency, f"bench_c{args.concurrency}", args.references)
    prep = serial[0]["prep"]
    bare = [_bare(prep, run["configs"], threads=int(job.search.resources["cpu"])) for run in serial]
    for run in [*serial, parallel]:
        run.pop("prep"), run.pop("configs")
    wall, in_trial, bare_s = (_median_of(serial, "wall_per_trial_s"), _median_of(serial, "in_trial_eval_mean_s"),
                              _median_of(bare, "mean_s"))
    result = {
        "benchmark": "search_overhead",
        "machine": machine_before, "load_avg_1m_after": os.getloadavg()[0],
        "env": {k: v for k, v in os.environ.items() if k.startswith(("TUNE_", "PCTUNE_"))},
        "references": args.references,
        "images": len(prep.labels), "timesteps": job.objective.timesteps, "repeats": args.repeats,
        "bare_eval": bare,
        "search_serial": serial,
        f"search_concurrency_{args.concurrency}": parallel,
        # medians over the repeats. Wall time per trial minus the bare evaluation: everything the service adds
        "overhead_per_trial_s": wall - bare_s,
        # of which outside the trial's own evaluation (scheduling, Optuna, reporting, state saving)
        "service_overhead_per_trial_s": wall - in_trial,
        "overhead_ratio": wall / bare_s,
        "in_trial_vs_bare": in_trial / bare_s,
        # the same wall time split into what the experiment pays once and what each trial pays
        "decomposition": {key: _median_of(serial, key, "decomposition") for key in serial[0]["decomposition"]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "search_serial", "bare_eval")}, indent=2))


if __name__ == "__main__":
    main()
