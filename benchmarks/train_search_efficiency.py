"""Training searches on the digits (issue 26): the compute (epochs trained) that TPE + ASHA over epochs
needs to reach plain TPE's median best, CNN-F ``cnnf_demo`` trained on ``--train`` digits and scored
on ``--val`` held-out training digits with sigma = 0.5 noise (mean cross-entropy over iterations 1..4).

Per seed, plain TPE runs ``--fifo-trials`` trials of ``--epochs`` epochs and TPE + ASHA ``--asha-trials``
(rungs at 1, 2, 4, ... epochs). A trial's compute is the epochs it trained; the curve of an arm is its
best fully trained score against the epochs trained so far, in the order trials ended. Writes JSON:

    python benchmarks/train_search_efficiency.py --seeds 0 1 2 --out benchmarks/results/train_search_efficiency.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_efficiency import cost_to_reach


def _arm(payload, space, scheduler: str, trials: int, seed: int, storage: str) -> dict:
    from pctune.metrics import METRIC
    from pctune.search.train_search import champion, epochs_trained, run_training_search

    start = time.perf_counter()
    results = run_training_search(payload, space, num_samples=trials, storage=storage, name=f"{scheduler}{seed}",
                                  scheduler=scheduler, seed=seed)
    wall = time.perf_counter() - start
    ended = sorted(results, key=lambda r: r.metrics.get("timestamp", 0))
    curve, spent, best = [], 0, float("inf")
    for result in ended:
        spent += epochs_trained(result)
        if epochs_trained(result) == payload.epochs:
            best = min(best, result.metrics[METRIC])
        curve.append([spent, best])
    top = champion(results, payload.epochs)
    return {"wall_s": round(wall, 1), "epochs_trained": spent, "best": top.metrics[METRIC] if top else None,
            "best_config": top.config if top else None, "curve": curve,
            "stopped_early": sum(epochs_trained(r) < payload.epochs for r in results)}


def _compute_to_reach(curve: list, target: float) -> int | None:
    """search_efficiency's ``cost_to_reach``, with None (JSON) for never."""
    spent = cost_to_reach(curve, target)
    return None if math.isinf(spent) else spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--fifo-trials", type=int, default=12)
    parser.add_argument("--asha-trials", type=int, default=24)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/train_search_efficiency.json")
    args = parser.parse_args()

    from pctune.data.demo import digits
    from pctune.models.cnnf import get_cnnf_spec
    from pctune.search.train_search import cnnf_space, training_payload

    load = os.getloadavg()[0]
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    x, y = digits("train")
    spec = get_cnnf_spec("cnnf_demo")
    payload = training_payload(spec, (x[:args.train], y[:args.train]), (x[-args.val:], y[-args.val:]),
                               epochs=args.epochs)
    space = {**cnnf_space(spec), "test_iterations": 4}  # one objective for every trial
    runs = {}
    with tempfile.TemporaryDirectory() as storage:
        for seed in args.seeds:
            runs[seed] = {arm: _arm(payload, space, arm, trials, seed, storage)
                          for arm, trials in (("fifo", args.fifo_trials), ("asha", args.asha_trials))}
            print(seed, {arm: (r["best"], r["epochs_trained"], r["wall_s"]) for arm, r in runs[seed].items()},
                  flush=True)
    ray.shutdown()
    target = statistics.median(r["fifo"]["best"] for r in runs.values())
    reach = {arm: [_compute_to_reach(r[arm]["curve"], target) for r in runs.values()] for arm in ("fifo", "asha")}
    fifo_budget = args.fifo_trials * args.epochs
    result = {
        "benchmark": "train_search_efficiency", "model": spec.name, "epochs": args.epochs,
        "train_images": args.train, "val_images": args.val, "sigma": 0.5, "test_iterations": 4,
        "trials": {"fifo": args.fifo_trials, "asha": args.asha_trials}, "seeds": args.seeds,
        "target_median_fifo_best": target, "epochs_to_reach_target": reach,
        "share_of_fifo_budget_to_reach": {arm: [None if v is None else round(v / fifo_budget, 3) for v in values]
                                          for arm, values in reach.items()},
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m_before": load,
                    "load_avg_1m_after": os.getloadavg()[0]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("target_median_fifo_best", "epochs_to_reach_target",
                                             "share_of_fifo_budget_to_reach")}, indent=2))


if __name__ == "__main__":
    main()
