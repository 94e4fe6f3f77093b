"""CNN-F against its plain CNN on the digits demo (issue 26, "results on the demo", first part).

For each seed, two networks of the same architecture (``cnnf_demo``) are trained the same way (Adam,
lr 1e-3, weight decay 5e-4, the same seeded batch order): the plain CNN with 0 feedback iterations
while training, and CNN-F with ``--train-iterations``. Both are then scored on the 500 test digits:

- accuracy at every test iteration t = 0..T, clean and under Gaussian noise (added to the normalized
  images, one seeded draw shared by both networks: the comparison is paired per image);
- the adversarial stage's targeted BIM (L-inf, pixels in [0, 1]) on the first ``--attack-images``
  test images that both networks classify correctly at every iteration, end to end through the
  iterations (``exact``) and by transfer from the plain pass, success rate per epsilon.

The plain CNN's t > 0 rows are its own feedback pathway, which it never trained; its t = 0 is the
baseline. Paired differences (CNN-F at t minus the plain CNN at t = 0) come with a 95% bootstrap
interval over the test images (each resample takes the same images for every seed). Writes JSON:

    python benchmarks/cnnf_demo.py --out benchmarks/results/cnnf_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pctune.data.demo import digits, digits_normalization
from pctune.data.noise import add_gaussian_noise
from pctune.evaluate.adversarial import AttackPayload, AttackSpec, Shard, run_shard
from pctune.models.cnnf import create_cnnf
from pctune.pc.cnnf import train_epoch


def _train(seed: int, iterations: int, epochs: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = create_cnnf("cnnf_demo")
    images, labels = digits("train")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=5e-4)
    for epoch in range(epochs):
        train_epoch(net, optimizer, images, labels, iterations=iterations,
                    generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return net.eval()


def _correct(net, x: torch.Tensor, labels: torch.Tensor, timesteps: int) -> np.ndarray:
    """[T+1, N] booleans: image n correct at iteration t."""
    return (net.run(x, timesteps).argmax(-1) == labels).numpy()


def _attack(net, pixels, labels, chosen, targets, timesteps: int, epsilons: list[float]) -> dict:
    mean, std = digits_normalization()
    setup = AttackPayload(net, None, pixels[chosen], labels[chosen], targets, pixels, [mean], [std], timesteps,
                          [AttackSpec("bim", epsilons, steps=10)])
    out = {}
    for t in range(timesteps + 1):
        shard = run_shard(setup, Shard("bim", "exact", t, 0, len(chosen)))
        out.setdefault("exact", {})[str(t)] = [float(np.mean(row)) for row in shard["success"][str(t)]]
    shard = run_shard(setup, Shard("bim", "transfer", timesteps, 0, len(chosen)))
    out["transfer"] = {t: [float(np.mean(row)) for row in rows] for t, rows in shard["success"].items()}
    return out


def _paired(cnnf: list[np.ndarray], plain: list[np.ndarray], resamples: int = 1000) -> dict:
    """Mean over seeds of (CNN-F correct at t) - (plain correct at t = 0) per t, with a 95% bootstrap
    interval over images (the same resampled images for every seed)."""
    diffs = np.stack([c.astype(float) - p[0].astype(float) for c, p in zip(cnnf, plain, strict=True)])  # [S, T+1, N]
    rng = np.random.default_rng(0)
    n = diffs.shape[-1]
    boot = np.stack([diffs[..., rng.integers(0, n, n)].mean(axis=(0, 2)) for _ in range(resamples)])
    return {"mean": diffs.mean(axis=(0, 2)).round(4).tolist(),
            "ci_low": np.quantile(boot, 0.025, axis=0).round(4).tolist(),
            "ci_high": np.quantile(boot, 0.975, axis=0).round(4).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-iterations", type=int, default=2)
    parser.add_argument("--test-iterations", type=int, default=4)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.03, 0.1, 0.2])
    parser.add_argument("--attack-images", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    T = args.test_iterations
    test_x, test_y = digits("test")
    pixels, _ = digits("test", normalize=False)
    conditions = {"clean": test_x, **{f"sigma={s:g}": add_gaussian_noise(test_x, s, seed=1) for s in args.sigmas}}
    correct = {name: {"plain": [], "cnnf": []} for name in conditions}
    attacks: dict[str, list] = {"plain": [], "cnnf": []}
    start = time.perf_counter()
    for seed in range(args.seeds):
        nets = {"plain": _train(seed, 0, args.epochs), "cnnf": _train(seed, args.train_iterations, args.epochs)}
        with torch.no_grad():
            for name, x in conditions.items():
                for kind, net in nets.items():
                    correct[name][kind].append(_correct(net, x, test_y, T))
        both = np.flatnonzero(correct["clean"]["plain"][-1].all(0) & correct["clean"]["cnnf"][-1].all(0))
        chosen = torch.as_tensor(both[:args.attack_images])
        generator = torch.Generator().manual_seed(seed)
        targets = (test_y[chosen] + torch.randint(1, 10, (len(chosen),), generator=generator)) % 10
        for kind, net in nets.items():
            attacks[kind].append(_attack(net, pixels, test_y, chosen, targets, T, args.epsilons))
        print(f"seed {seed} done after {time.perf_counter() - start:.0f}s", flush=True)
    accuracy = {name: {kind: np.mean(runs, axis=(0, 2)).round(4).tolist() for kind, runs in by_kind.items()}
                for name, by_kind in correct.items()}
    paired = {name: _paired(by_kind["cnnf"], by_kind["plain"]) for name, by_kind in correct.items()}
    success = {kind: {mode: {t: np.mean([run[mode][t] for run in runs], axis=0).round(4).tolist()
                             for t in runs[0][mode]} for mode in ("exact", "transfer")}
               for kind, runs in attacks.items()}
    report = {"benchmark": "cnnf_demo", "model": "cnnf_demo", "seeds": args.seeds, "epochs": args.epochs,
              "train_iterations": {"plain": 0, "cnnf": args.train_iterations}, "test_iterations": T,
              "test_images": len(test_y), "attack": {"name": "bim", "steps": 10, "epsilons": args.epsilons,
                                                    "images_per_seed": args.attack_images},
              "accuracy_per_iteration": accuracy, "cnnf_minus_plain_t0": paired, "attack_success": success,
              "seconds": round(time.perf_counter() - start, 1),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "load_avg_1m": os.getloadavg()[0]}}
    print(json.dumps({k: report[k] for k in ("accuracy_per_iteration", "cnnf_minus_plain_t0", "attack_success")},
                     indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
