"""Adversarial evaluation across timesteps (``shared/spec/evaluation.md``, "Adversarial robustness").

Images the network classifies correctly at every timestep 0..T are chosen with a fixed seed, each
gets one target class (seeded, different from its label) used for every timestep, and the network
unrolled to timestep t is attacked with foolbox (pixel bounds [0, 1], normalization inside the model):

- ``bim``: targeted L-inf Basic Iterative Method (paper: 100 steps, random start, step 2.5/steps);
- ``pgd``: targeted L2 projected gradient descent with random start;
- ``hsj``: targeted HopSkipJump, gradient-free, started from images the model puts in the target class.

Gradient attacks run in three modes, recorded with every number: ``exact`` (through the
error-correction term, double backward), ``constant-error`` (that term treated as a constant, like
the reference package) and ``transfer`` (crafted on timestep 0, evaluated at t); ``hsj`` runs in
mode ``decision``. Work is split into shards (attack x mode x timestep x chunk of images) that run as
Ray tasks and are checkpointed one file each, so an interrupted run or a lost worker redoes only the
missing shards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pctune.errors import PctuneError
from pctune.evaluate.settings import ATTACKS, GRADIENT_MODES, AttackSpec, default_attacks  # noqa: F401 (re-exported)
from pctune.evaluate.shards import run_shards
from pctune.measure.unrolled import Unrolled
from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet
from pctune.utils import Log, print_line, pyplot, save_figure


@dataclass
class AttackPayload:
    """Everything a shard needs (sent once through the Ray object store)."""

    net: PredictiveNet
    hparams: Hyperparameters
    pixels: Tensor  # the selected images [N, C, H, W] in [0, 1]
    labels: Tensor
    targets: Tensor
    pool: Tensor  # candidate starting points for hsj: pixel images the attack may start from
    mean: Sequence[float]
    std: Sequence[float]
    timesteps: int
    attacks: list[AttackSpec]


# -- choosing the images --------------------------------------------------------------------------
@torch.no_grad()
def predictions(net: PredictiveNet, hparams: Hyperparameters, pixels: Tensor, mean, std, timesteps: int,
                batch_size: int = 100) -> Tensor:
    """Predicted classes at every timestep, ``[T+1, N]``."""
    model = Unrolled(net, hparams, timesteps, mean, std)
    preds = []
    for i in range(0, len(pixels), batch_size):
        x = (pixels[i:i + batch_size] - model.mean) / model.std
        preds.append(net.run(x, timesteps, hparams).argmax(-1))
    return torch.cat(preds, dim=1)


def select_images(net: PredictiveNet, hparams: Hyperparameters, pixels: Tensor, labels: Tensor, mean, std,
                  timesteps: int, count: int, seed: int) -> tuple[Tensor, Tensor]:
    """(indices, targets): ``count`` images correct at every timestep 0..T, in a seeded order, and one
    seeded target class per image, different from its label."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    preds = predictions(net, hparams, pixels[order], mean, std, timesteps)
    correct = (preds == labels[order]).all(dim=0)
    chosen = order[correct][:count]
    if len(chosen) < count:
        raise PctuneError(f"only {len(chosen)} of {len(labels)} images are classified correctly at every "
                          f"timestep 0..{timesteps}; asked for {count}")
    with torch.no_grad():
        num_classes = Unrolled(net, hparams, 0, mean, std)(pixels[:1]).shape[-1]
    gen = torch.Generator().manual_seed(seed + 1)
    offsets = torch.randint(1, num_classes, (len(chosen),), generator=gen)
    targets = (labels[chosen] + offsets) % num_classes
    return chosen, targets


# -- shards ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    attack: str
    mode: str
    timestep: int  # for transfer: every timestep is evaluated in one shard (crafted once at t = 0)
    start: int
    stop: int

    @property
    def name(self) -> str:
        t = "all" if self.mode == "transfer" else str(self.timestep)
        return f"{self.attack}_{self.mode}_t{t}_{self.start:05d}-{self.stop:05d}"


def plan_shards(attacks: Sequence[AttackSpec], num_images: int, timesteps: int, chunk: int) -> list[Shard]:
    shards = []
    for attack in attacks:
        n = min(num_images, attack.max_images or num_images)
        for mode in attack.modes:
            steps = [0] if mode == "transfer" else range(timesteps + 1)
            for t in steps:
                for start in range(0, n, chunk):
                    shards.append(Shard(attack.name, mode, t, start, min(start + chunk, n)))
    return shards


def _foolbox_attack(spec: AttackSpec):
    import foolbox as fb

    if spec.name == "bim":
        return fb.attacks.LinfBasicIterativeAttack(steps=spec.steps, rel_stepsize=spec.rel_stepsize or 2.5 / spec.steps,
                                                   random_start=True)
    if spec.name == "pgd":
        return fb.attacks.L2ProjectedGradientDescentAttack(steps=spec.steps,
                                                           rel_stepsize=spec.rel_stepsize or 2.5 / spec.steps,
                                                           random_start=True)
    return fb.attacks.HopSkipJumpAttack(steps=spec.steps, constraint="l2", max_gradient_eval_steps=1000)


def run_shard(setup: AttackPayload, shard: Shard, seed: int = 0) -> dict[str, Any]:
    """Attack one shard; returns per-image success (0/1) per epsilon and timestep."""
    import foolbox as fb

    spec = next(a for a in setup.attacks if a.name == shard.attack)
    device = _device(setup.net)
    x = setup.pixels[shard.start:shard.stop].to(device)
    labels = setup.labels[shard.start:shard.stop].to(device)
    targets = setup.targets[shard.start:shard.stop].to(device)
    torch.manual_seed(seed + shard.start * 7919 + shard.timestep)
    start = time.perf_counter()
    attack_t = 0 if shard.mode == "transfer" else shard.timestep
    grad_mode = "exact" if shard.mode in ("transfer", "decision") else shard.mode
    model = Unrolled(setup.net, setup.hparams, attack_t, setup.mean, setup.std, grad_mode).to(device).eval()
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=device)
    kwargs = {}
    if spec.name == "hsj":
        kwargs["starting_points"], found = _starting_points(setup, model, targets)
        keep = found
    else:
        keep = torch.ones(len(x), dtype=torch.bool, device=device)
    success: dict[str, list[list[int]]] = {}
    if keep.any():
        criterion = fb.criteria.TargetedMisclassification(targets[keep])
        _, clipped, is_adv = _foolbox_attack(spec)(fmodel, x[keep], criterion, epsilons=spec.epsilons,
                                                   **{k: v[keep] for k, v in kwargs.items()})
    steps = range(setup.timesteps + 1) if shard.mode == "transfer" else [shard.timestep]
    for t in steps:
        rows = []
        for e_index in range(len(spec.epsilons)):
            hit = torch.zeros(len(x), dtype=torch.long, device=device)
            if keep.any():
                if shard.mode == "transfer":
                    at_t = Unrolled(setup.net, setup.hparams, t, setup.mean, setup.std).to(device)
                    with torch.no_grad():
                        hit[keep] = (at_t(clipped[e_index]).argmax(-1) == targets[keep]).long()
                else:
                    hit[keep] = is_adv[e_index].long()
            rows.append(hit.cpu().tolist())
        success[str(t)] = rows
    elapsed = time.perf_counter() - start
    return {**asdict(shard), "epsilons": spec.epsilons, "success": success,
            "attacked": keep.long().cpu().tolist(), "labels": labels.cpu().tolist(), "seconds": elapsed}


def _starting_points(setup: AttackPayload, model: Unrolled, targets: Tensor) -> tuple[Tensor, Tensor]:
    """For hsj: per image, a pool image the model at this timestep classifies as its target."""
    device = targets.device
    with torch.no_grad():
        pool = setup.pool.to(device)
        pool_pred = torch.cat([model(pool[i:i + 100]).argmax(-1) for i in range(0, len(pool), 100)])
    starts = torch.zeros((len(targets), *pool.shape[1:]), device=device)
    found = torch.zeros(len(targets), dtype=torch.bool, device=device)
    for i, target in enumerate(targets.tolist()):
        candidates = (pool_pred == target).nonzero().flatten()
        if len(candidates):
            starts[i] = pool[candidates[0]]
            found[i] = True
    return starts, found


def _device(net: PredictiveNet) -> torch.device:
    return next(net.parameters()).device


# -- running all shards -----------------------------------------------------------------------------
def run_all(setup: AttackPayload, out_dir: Path, chunk: int = 50, use_ray: bool = True, num_gpus: float = 0.0,
            log: Log = print_line, seed: int = 0) -> list[dict]:
    """Run every shard not yet in ``out_dir/shards`` (on Ray, or in this process) and return all results."""
    shards = plan_shards(setup.attacks, len(setup.labels), setup.timesteps, chunk)
    return run_shards(partial(run_shard, seed=seed), setup, shards, out_dir, use_ray=use_ray,
                      num_gpus=num_gpus, log=log, what="adversarial")


# -- results --------------------------------------------------------------------------------------
def success_table(results: list[dict], timesteps: int, resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Success rate per (attack, mode, epsilon, timestep), relative to timestep 0, with paired
    bootstrap 95% intervals (images resampled once per replicate, for every timestep)."""
    grouped: dict[tuple[str, str], dict[int, list]] = {}
    epsilons: dict[str, list[float]] = {}
    for r in results:
        epsilons[r["attack"]] = r["epsilons"]
        per_t = grouped.setdefault((r["attack"], r["mode"]), {})
        for t, rows in r["success"].items():
            per_t.setdefault(int(t), []).append((r["start"], rows, r["attacked"]))
    out = []
    rng = np.random.default_rng(seed)
    for (attack, mode), per_t in sorted(grouped.items()):
        steps = sorted(per_t)
        for e, eps in enumerate(epsilons[attack]):
            matrix = np.array([_concat(per_t[t], e) for t in steps], dtype=float)  # [T+1, images]
            attacked = np.array(_concat_attacked(per_t[steps[0]]), dtype=bool)
            matrix = matrix[:, attacked]
            rates = matrix.mean(axis=1)
            idx = rng.integers(0, matrix.shape[1], size=(resamples, matrix.shape[1]))
            boot = matrix[:, idx].mean(axis=2)  # [T+1, resamples]
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = boot / boot[0:1]
                rel_point = rates / rates[0] if rates[0] > 0 else np.full_like(rates, np.nan)
            for i, t in enumerate(steps):
                out.append({"attack": attack, "mode": mode, "epsilon": eps, "timestep": t,
                            "success_rate": rates[i], "ci_low": np.percentile(boot[i], 2.5),
                            "ci_high": np.percentile(boot[i], 97.5), "relative_to_t0": rel_point[i],
                            "rel_ci_low": np.nanpercentile(rel[i], 2.5) if np.isfinite(rel[i]).any() else np.nan,
                            "rel_ci_high": np.nanpercentile(rel[i], 97.5) if np.isfinite(rel[i]).any() else np.nan,
                            "images": int(matrix.shape[1])})
    return pd.DataFrame(out)


def _concat(chunks: list, e: int) -> list[int]:
    return [v for _, rows, _ in sorted(chunks, key=lambda c: c[0]) for v in rows[e]]


def _concat_attacked(chunks: list) -> list[int]:
    return [v for _, _, attacked in sorted(chunks, key=lambda c: c[0]) for v in attacked]


def cost_table(results: list[dict]) -> pd.DataFrame:
    """Measured seconds per image per attacked timestep, per attack and mode."""
    rows = [{"attack": r["attack"], "mode": r["mode"], "timestep": r["timestep"],
             "seconds_per_image": r["seconds"] / max(1, r["stop"] - r["start"])} for r in results]
    frame = pd.DataFrame(rows)
    return frame.groupby(["attack", "mode", "timestep"], as_index=False)["seconds_per_image"].mean()


def plot_success(table: pd.DataFrame, path: Path) -> Path:
    """Success rate over timesteps, one panel per attack, a line per (mode, epsilon)."""
    plt = pyplot()
    attacks = sorted(table.attack.unique())
    fig, axes = plt.subplots(1, len(attacks), figsize=(5 * len(attacks), 4), squeeze=False)
    for ax, attack in zip(axes[0], attacks, strict=True):
        sub = table[table.attack == attack]
        for (mode, eps), group in sub.groupby(["mode", "epsilon"]):
            group = group.sort_values("timestep")
            ax.errorbar(group.timestep, group.success_rate, yerr=[group.success_rate - group.ci_low,
                        group.ci_high - group.success_rate], marker="o", capsize=2, label=f"{mode} eps={eps:g}")
        ax.set(title=attack, xlabel="timestep", ylabel="targeted success rate", ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
    return save_figure(fig, path)
