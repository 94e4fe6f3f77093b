"""Per-trial overhead of the search service on the embedded demo.

Compares the wall time per trial of a real Ray Tune + Optuna search (``pctune search demo``'s code
path, one trial at a time, then ``--concurrency`` at a time) with the bare evaluation of the same
points in one process (``pctune.search.objective.score``, same thread count as a trial). Writes JSON:

    python benchmarks/search_overhead.py --trials 30 --out benchmarks/results/search_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def _search(job, trials: int, concurrency: int) -> dict:
    from pctune.search import driver
    from pctune.search.prepare import prepare
    from pctune.search.rundir import load_trials

    job.search.num_samples = trials
    job.search.max_concurrent_trials = concurrency
    job.search.starting_points = []
    prep = prepare(job, log=lambda _m: None)
    setup = driver.trial_setup(prep)
    stage = f"bench_c{concurrency}"
    start = time.perf_counter()
    driver.run_joint(prep, setup, log=lambda _m: None, stage=stage)  # starting points: none (set above)
    wall = time.perf_counter() - start
    done = load_trials(job.run_dir / stage)
    evals = [t.metrics["eval_seconds"] for t in done]
    return {"trials": len(done), "wall_s": wall, "wall_per_trial_s": wall / len(done),
            "in_trial_eval_mean_s": statistics.mean(evals), "model_loads_max": max(
                t.metrics["model_loads"] for t in done), "configs": [t.config for t in done], "prep": prep}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=2, help="second run: trials at a time")
    parser.add_argument("--out", default="benchmarks/results/search_overhead.json")
    args = parser.parse_args()

    import ray

    from pctune.search.driver import connect
    from pctune.search.job import load_job

    with tempfile.TemporaryDirectory() as tmp:
        job = load_job("demo", {"run.storage_path": tmp})
        t0 = time.perf_counter()
        connect(None, log=lambda _m: None)
        ray_start = time.perf_counter() - t0
        serial = _search(job, args.trials, 1)
        parallel = _search(job, args.trials, args.concurrency)
        ray.shutdown()
    prep = serial.pop("prep")
    parallel.pop("prep")
    bare = _bare(prep, serial.pop("configs"), threads=int(job.search.resources["cpu"]))
    parallel.pop("configs")
    result = {
        "benchmark": "search_overhead",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_1m": os.getloadavg()[0]},
        "images": len(prep.labels), "timesteps": job.objective.timesteps,
        "ray_start_s": ray_start,
        "bare_eval": bare,
        "search_serial": serial,
        f"search_concurrency_{args.concurrency}": parallel,
        # wall time per trial minus the bare evaluation: everything the service adds
        "overhead_per_trial_s": serial["wall_per_trial_s"] - bare["mean_s"],
        # of which outside the trial's own evaluation (scheduling, Optuna, reporting, state saving)
        "service_overhead_per_trial_s": serial["wall_per_trial_s"] - serial["in_trial_eval_mean_s"],
        "overhead_ratio": serial["wall_per_trial_s"] / bare["mean_s"],
        "in_trial_vs_bare": serial["in_trial_eval_mean_s"] / bare["mean_s"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
