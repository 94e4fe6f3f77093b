"""Search efficiency on the embedded demo: plain TPE at full fidelity against TPE + ASHA (+ the
timestep-0 cache), on the same compute, over several seeds; and the per-trial saving of the
timestep-0 cache on PVGG16.

Both arms run the real search code (Ray Tune + Optuna, ``pctune search demo``'s driver) on the demo's
real digits and embedded model; only ``search.seed``, ``search.scheduler``, ``search.num_samples`` and
``search.cache_gb`` differ. Compute is counted in image-timesteps evaluated: a trial that scored n
images costs n x T for timesteps 1..T plus n for timestep 0, less the images whose timestep 0 came
from the cache (``t0_cached``); ``eval_seconds`` is the sum of the trials' evaluation seconds, and
``wall_clock`` the driver's clock from the experiment's start to the end of the trial that first
reached the target (everything the service adds included). The anytime curve is the best
full-fidelity mean_ce among the trials so far (in creation order) against the cumulative compute.
Writes JSON:

    python benchmarks/search_efficiency.py --out benchmarks/results/search_efficiency.json
    python benchmarks/search_efficiency.py --seeds 1 --fifo-trials 10 --asha-trials 30   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ARMS = {"tpe": {"search.scheduler": "fifo", "search.cache_gb": 0.0},
        "tpe+asha": {"search.scheduler": "asha", "search.cache_gb": 1.0},
        "tpe+hyperband": {"search.scheduler": "hyperband", "search.cache_gb": 1.0},
        # ASHA keeping 1 in 4 at each rung (rungs at 8, 32, 125 of 500 images): a stricter cutoff
        "tpe+asha-rf4": {"search.scheduler": "asha", "search.reduction_factor": 4.0, "search.cache_gb": 1.0},
        # multi-fidelity TPE (pctune.search.mf_tpe): TPE models the largest rung enough trials reached
        "tpe-mf+asha": {"search.sampler": "tpe-mf", "search.scheduler": "asha", "search.cache_gb": 1.0},
        # both: the stricter rungs, with a sampler that models the rungs instead of only the finished trials
        "tpe-mf+asha-rf4": {"search.sampler": "tpe-mf", "search.scheduler": "asha", "search.reduction_factor": 4.0,
                            "search.cache_gb": 1.0}}


def run_arm(arm: str, seed: int, trials: int, storage: Path) -> dict:
    """One seeded search of the demo job; its trials' costs and scores."""
    from search_overhead import Timeline  # benchmarks/ is the script's folder

    from pctune.search import driver
    from pctune.search.job import load_job
    from pctune.search.prepare import prepare
    from pctune.search.rundir import load_trials

    overrides = {**ARMS[arm], "search.seed": seed, "search.num_samples": trials,
                 "run.storage_path": str(storage / f"{arm}-{seed}")}
    job = load_job("demo", overrides)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        prep = prepare(job, log=lambda _m: None)
        driver.connect(None, log=lambda _m: None)
        setup = driver.trial_setup(prep)
        timeline = Timeline()
        start = time.perf_counter()
        driver.run_joint(prep, setup, log=lambda _m: None, callbacks=[timeline])
        wall = time.perf_counter() - start
    ended = {trial_id: at for kind, trial_id, at, _ in timeline.events if kind == "complete"}
    timesteps = job.objective.timesteps
    rows = []
    for t in load_trials(job.run_dir / "joint"):
        if not t.finished:
            continue
        m = t.metrics
        images = int(m["num_images"])
        cached = int(m.get("t0_cached", 0))
        rows.append({"index": t.index, "images": images, "final": bool(m.get("final", 1.0)),
                     "diverged": bool(m["diverged"]), "mean_ce": float(m["mean_ce"]),
                     "compute": images * timesteps + images - cached, "compute_no_cache": images * (timesteps + 1),
                     "seconds": float(m["eval_seconds"]),
                     "done_s": ended.get(t.trial_id, wall + start) - start})
    return {"arm": arm, "seed": seed, "trials": rows, "wall_s": wall, "num_images": len(prep.labels),
            "timesteps": timesteps}


def anytime(rows: list[dict], key: str = "compute") -> list[tuple[float, float]]:
    """(cumulative cost, best full-fidelity mean_ce so far) after each trial, in creation order."""
    curve, spent, best = [], 0.0, math.inf
    for row in sorted(rows, key=lambda r: r["index"]):
        spent += row[key]
        if row["final"] and not row["diverged"]:
            best = min(best, row["mean_ce"])
        curve.append((spent, best))
    return curve


def cost_to_reach(curve: list[tuple[float, float]], target: float) -> float:
    return next((spent for spent, best in curve if best <= target), math.inf)


def proposals_to_reach(rows: list[dict], target: float) -> float:
    """How many trials (proposals, in creation order) a run needed to first reach ``target``."""
    return cost_to_reach(anytime([{**row, "unit": 1} for row in rows], "unit"), target)


def wall_to_reach(rows: list[dict], target: float) -> float:
    """Seconds from the experiment's start to the end of the first full-fidelity trial at or below ``target``."""
    return min((row["done_s"] for row in rows if row["final"] and not row["diverged"] and row["mean_ce"] <= target),
               default=math.inf)


def first_rung_pass_rate(rows: list[dict]) -> float:
    """The share of the trials that went on past the first rung (the fewest images any trial reported)."""
    first = min(row["images"] for row in rows)
    return sum(row["images"] > first for row in rows) / len(rows)


def best_within(curve: list[tuple[float, float]], budget: float) -> float:
    return min((best for spent, best in curve if spent <= budget), default=math.inf)


def summarize(runs: list[dict], arm: str) -> dict:
    """``arm`` against plain TPE: the compute (and seconds) it needs to reach plain TPE's median final
    best, and its best at plain TPE's budget (medians over the seeds)."""
    plain = [r for r in runs if r["arm"] == "tpe"]
    fast = [r for r in runs if r["arm"] == arm]
    out = {}
    for key, unit in (("compute", "image_timesteps"), ("seconds", "eval_seconds")):
        plain_curves = [anytime(r["trials"], key) for r in plain]
        fast_curves = [anytime(r["trials"], key) for r in fast]
        budget = statistics.median(c[-1][0] for c in plain_curves)
        target = statistics.median(c[-1][1] for c in plain_curves)
        reach = [cost_to_reach(c, target) for c in fast_curves]
        out[unit] = {
            "plain_budget_median": budget, "plain_final_best_median": target,
            "cost_to_reach_plain_median_best": reach,
            "cost_to_reach_median": statistics.median(reach),
            "fraction_of_plain_budget": statistics.median(reach) / budget,
            "best_at_plain_budget": [best_within(c, budget) for c in fast_curves],
            "best_at_plain_budget_median": statistics.median(best_within(c, budget) for c in fast_curves),
        }
    target = out["image_timesteps"]["plain_final_best_median"]
    if all("done_s" in row for r in plain + fast for row in r["trials"]):  # runs of an older result file lack it
        plain_reach = [wall_to_reach(r["trials"], target) for r in plain]
        fast_reach = [wall_to_reach(r["trials"], target) for r in fast]
        out["wall_clock"] = {"target": target, "plain_wall_to_reach": plain_reach,
                             "plain_wall_to_reach_median": statistics.median(plain_reach),
                             "wall_to_reach": fast_reach, "wall_to_reach_median": statistics.median(fast_reach),
                             "plain_search_wall_median": statistics.median(r["wall_s"] for r in plain),
                             "search_wall_median": statistics.median(r["wall_s"] for r in fast)}
    out["proposals_to_reach_plain_median_best"] = {name: [proposals_to_reach(r["trials"], target) for r in group]
                                                   for name, group in (("tpe", plain), (arm, fast))}
    out["first_rung_pass_rate"] = [first_rung_pass_rate(r["trials"]) for r in fast]
    fast_rows = [row for r in fast for row in r["trials"]]
    out["trials_stopped_early"] = sum(not row["final"] for row in fast_rows)
    out["trials"] = len(fast_rows)
    out["mean_cost_of_a_trial_vs_full"] = statistics.mean(row["compute"] for row in fast_rows) / (
        fast[0]["num_images"] * (fast[0]["timesteps"] + 1))
    out["fraction_without_cache_credit"] = statistics.median(
        cost_to_reach(anytime(r["trials"], "compute_no_cache"), out["image_timesteps"]["plain_final_best_median"])
        for r in fast) / out["image_timesteps"]["plain_budget_median"]
    return out


def t0_saving(image_size: int = 64, num_images: int = 64, batch_size: int = 32, repeats: int = 2) -> dict:
    """Seconds per trial of PVGG16 (random weights) on the CPU with the timestep-0 cache cold (the
    first trial of a worker: it computes and keeps timestep 0) and warm (every later trial)."""
    import torch

    import pctune
    from pctune.search.objective import score_chunks
    from pctune.search.t0cache import TimestepZeroCache

    torch.manual_seed(0)
    net = pctune.create_model("pvgg16")
    images = torch.randn(num_images, 3, image_size, image_size)
    labels = torch.randint(0, 1000, (num_images,))
    hp = net.hyperparameters("default")

    def trial(starts=None) -> tuple[float, float]:
        start = time.perf_counter()
        *_, final = score_chunks(net, images, labels, hp, batch_size=batch_size, starts=starts)
        return time.perf_counter() - start, final["mean_ce"]

    trial()  # warm-up
    plain, warm, cold = [], [], []
    for _ in range(repeats):
        plain.append(trial())
        cache, counter = TimestepZeroCache(), {"cached": 0}
        cold.append(trial(cache.starts(net, ("bench",), 4.0, counter)))
        warm.append(trial(cache.starts(net, ("bench",), 4.0, counter)))
    assert len({v for _, v in plain + warm + cold}) == 1, "the cache changed the score"
    med = {name: statistics.median(s for s, _ in runs) for name, runs in
           (("no_cache", plain), ("cache_cold", cold), ("cache_warm", warm))}
    entry = next(iter(cache.entries.values()))
    return {"model": "pvgg16 (random weights)", "image_size": image_size, "num_images": num_images,
            "batch_size": batch_size, "timesteps": 4, "hparams": "default preset (every alpha > 0)",
            "seconds_per_trial_median": med, "saving_warm_vs_none": 1 - med["cache_warm"] / med["no_cache"],
            "cache_bytes_per_image": entry.nbytes() / batch_size, "threads": torch.get_num_threads()}


def batching_headroom(repeats: int = 3) -> list[dict]:
    """Images per second of one configuration's run at a trial's batch size and at 4x that batch: the
    most that scoring K = 4 configurations in one batched pass could gain on this device."""
    import torch

    import pctune

    rows = []
    for model, shape, batch in (("demo", (1, 16, 16), 100), ("pvgg16", (3, 64, 64), 16)):
        torch.manual_seed(0)
        net = pctune.create_model(model)
        hp = net.hyperparameters("default")
        row = {"model": model, "input": list(shape)}
        for size in (batch, 4 * batch):
            x = torch.randn(size, *shape)
            net.run(x, 4, hp, return_states=True)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                net.run(x, 4, hp, return_states=True)
                times.append(time.perf_counter() - start)
            row[f"images_per_s_batch_{size}"] = size / statistics.median(times)
        row["gain_4x_batch"] = row[f"images_per_s_batch_{4 * batch}"] / row[f"images_per_s_batch_{batch}"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--fifo-trials", type=int, default=60)
    parser.add_argument("--asha-trials", type=int, default=150, help="trials of each early-stopping arm")
    parser.add_argument("--arms", default="tpe,tpe+asha,tpe+hyperband")
    parser.add_argument("--merge", type=Path, help="runs of an earlier result file to add (other arms)")
    parser.add_argument("--skip-engine", action="store_true", help="no timestep-0 / batching measurements")
    parser.add_argument("--skip-search", action="store_true", help="only the timestep-0 cache measurement")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": "none measured"},
              "arms": ARMS, "fifo_trials": args.fifo_trials, "early_stopping_trials": args.asha_trials}
    if not args.skip_search:
        runs = json.loads(args.merge.read_text())["runs"] if args.merge else []
        arms = args.arms.split(",")
        with tempfile.TemporaryDirectory() as tmp:
            for seed in range(args.seeds):
                for arm in arms:
                    trials = args.fifo_trials if arm == "tpe" else args.asha_trials
                    run = run_arm(arm, seed, trials, Path(tmp))
                    runs.append(run)
                    best = anytime(run["trials"])[-1]
                    print(f"{arm:9s} seed {seed}: {len(run['trials'])} trials, compute {best[0]:.0f} image-timesteps, "
                          f"best {best[1]:.4f}, {run['wall_s']:.0f}s", flush=True)
        result["runs"] = runs
        result["summary"] = {arm: summarize(runs, arm) for arm in sorted({r["arm"] for r in runs} - {"tpe"})}
        print(json.dumps(result["summary"], indent=2))
    if args.skip_engine:
        return _write(result, args.out)
    result["t0_cache"] = t0_saving()
    print(json.dumps(result["t0_cache"], indent=2))
    result["batching_headroom"] = batching_headroom()
    print(json.dumps(result["batching_headroom"], indent=2))
    _write(result, args.out)


def _write(result: dict, out: Path | None) -> None:
    if out:
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
