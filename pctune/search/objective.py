"""The tuning objective (``shared/spec/dynamics.md``, "The tuning objective"), in plain PyTorch.

Score = cross-entropy of the logits against the labels, averaged over the images and over timesteps
t = 1..T (lower is better). Also reported, as a flat dict of floats (the keys later become MLflow
metrics): ``ce_t{t}`` and ``accuracy_t{t}`` for every t = 0..T, and ``recon_error_pc{n}``, pcoder n's
per-image reconstruction error eps_n averaged over the images and over t = 1..T.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor
from torch.nn import functional as F

from pctune.models.registry import output_classes
from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet

METRIC = "mean_ce"
MODE = "min"


def default_penalty(num_classes: int) -> float:
    """The score of a diverged trial: finite, and far worse than chance (ln C)."""
    return 10.0 * math.log(max(num_classes, 2))


def score(
    net: PredictiveNet,
    images: Tensor,
    labels: Tensor,
    hparams: Hyperparameters,
    *,
    timesteps: int = 4,
    batch_size: int = 100,
    penalty: float | None = None,
) -> dict[str, float]:
    """Evaluate ``hparams`` on (already noisy) ``images`` on the device ``net`` lives on.

    When the dynamics diverge (a NaN or inf logit or error), the evaluation stops and the trial is
    reported as failed: ``diverged = 1`` and every cross-entropy set to the finite ``penalty`` (default
    :func:`default_penalty`), so the search can rank the point and go on. A finite score at or above
    the penalty (logits exploding without overflowing) counts as diverged too, so that a failed point
    never ranks below a blown-up one and the samplers never see astronomically large values.
    """
    start = time.perf_counter()
    device = next(net.parameters()).device
    n_pc = net.num_pcoders
    ce_sum = torch.zeros(timesteps + 1, dtype=torch.float64)
    correct = torch.zeros(timesteps + 1, dtype=torch.float64)
    recon = torch.zeros(timesteps + 1, n_pc, dtype=torch.float64)
    seen = 0
    diverged = False
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device, non_blocking=True)
        y = labels[i:i + batch_size].to(device, non_blocking=True)
        try:
            result = net.run(x, timesteps, hparams, return_states=True)
        except RuntimeError as exc:  # e.g. an alpha so large that alpha * s_n overflows float32
            if "overflow" not in str(exc):
                raise
            diverged = True
            break
        logits = result.logits.float()
        if not (torch.isfinite(logits).all() and torch.isfinite(result.errors).all()):
            diverged = True
            break
        ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(timesteps + 1), reduction="none")
        ce_sum += ce.view(timesteps + 1, -1).sum(1).double().cpu()
        correct += (logits.argmax(-1) == y).sum(1).double().cpu()
        recon += result.errors.double().sum(2).cpu()  # errors: [T+1, N, B]
        seen += len(y)
    counts = torch.full((timesteps + 1,), float(seen), dtype=torch.float64)
    if diverged:  # timestep 0 is the feedforward pass, measured before the dynamics diverged: report it
        ce0, correct0 = _feedforward(net, images[seen:], labels[seen:], batch_size, device)
        ce_sum[0] += ce0
        correct[0] += correct0
        counts[0] = len(images)
    num_classes = logits.shape[-1] if seen else output_classes(net)
    return _metrics(ce_sum, correct, recon, counts, timesteps, diverged, penalty, num_classes, start)


@torch.no_grad()
def _feedforward(net: PredictiveNet, images: Tensor, labels: Tensor, batch_size: int,
                 device: torch.device) -> tuple[float, float]:
    """Summed cross-entropy and correct count of the feedforward pass (timestep 0) over ``images``."""
    ce, correct = 0.0, 0.0
    for i in range(0, len(images), batch_size):
        x, y = images[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        logits = net(x).float()
        ce += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    return ce, correct


def _metrics(ce_sum: Tensor, correct: Tensor, recon: Tensor, counts: Tensor, timesteps: int, diverged: bool,
             penalty: float | None, num_classes: int, start: float) -> dict[str, float]:
    penalty = default_penalty(num_classes) if penalty is None else float(penalty)
    seen = int(counts[1].item())
    count = max(seen, 1)
    ce = (ce_sum / counts.clamp(min=1)).tolist()
    acc = (correct / counts.clamp(min=1)).tolist()
    per_t = recon / count  # [T+1, N]
    errors = per_t[1:].mean(0).tolist()
    if diverged:
        ce = [ce[0]] + [penalty] * timesteps
        errors = [e if math.isfinite(e) else penalty for e in errors]
        per_t = torch.where(torch.isfinite(per_t), per_t, torch.full_like(per_t, penalty))
    mean_ce = sum(ce[1:]) / timesteps
    if not diverged and mean_ce >= penalty:  # finite but exploding logits: a failed point too
        diverged = True
    metrics = {METRIC: penalty if diverged else mean_ce, "diverged": float(diverged)}
    metrics.update({f"ce_t{t}": float(v) for t, v in enumerate(ce)})
    metrics.update({f"accuracy_t{t}": float(v) for t, v in enumerate(acc)})
    metrics.update({f"recon_error_pc{n}": float(v) for n, v in enumerate(errors, start=1)})
    metrics.update({f"recon_error_pc{n}_t{t}": float(per_t[t, n - 1]) for n in range(1, len(errors) + 1)
                    for t in range(timesteps + 1)})
    metrics["num_images"] = float(seen)
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics
