"""The tuning objective (``shared/spec/dynamics.md``, "The tuning objective"), in plain PyTorch.

Score = cross-entropy of the logits against the labels, averaged over the images and over timesteps
t = 1..T (lower is better). Also reported, as a flat dict of floats (the keys later become MLflow
metrics): ``ce_t{t}`` and ``accuracy_t{t}`` for every t = 0..T, and ``recon_error_pc{n}``, pcoder n's
per-image reconstruction error eps_n averaged over the images and over t = 1..T.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from pctune.metrics import METRIC, MODE, at_timestep, recon_error  # noqa: F401 (MODE: re-exported)
from pctune.models.registry import output_classes
from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet

#: ``starts(index, x)``: the precomputed timestep 0 of the batch of ``x`` starting at image ``index``, or None.
StartFn = Callable[[int, Tensor], object | None]


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
    starts: StartFn | None = None,
) -> dict[str, float]:
    """Evaluate ``hparams`` on all of ``images`` (already noisy) on the device ``net`` lives on: the
    last, final result of :func:`score_chunks` with one chunk."""
    *_, final = score_chunks(net, images, labels, hparams, timesteps=timesteps, batch_size=batch_size,
                             penalty=penalty, starts=starts)  # one report: at the end
    return final


def score_chunks(
    net: PredictiveNet,
    images: Tensor,
    labels: Tensor,
    hparams: Hyperparameters,
    *,
    timesteps: int = 4,
    batch_size: int = 100,
    report_at: Sequence[int] = (),
    penalty: float | None = None,
    starts: StartFn | None = None,
    sums: RunningSums | None = None,
) -> Iterator[dict[str, float]]:
    """Evaluate ``hparams`` on ``images`` in their order, yielding the running metrics whenever the
    number of images scored reaches one of ``report_at`` and at the end: ``num_images`` is how many
    were scored, ``total_images`` how many there are, and ``final`` is 1 on the last result (every
    image scored, or the dynamics diverged). Batches never straddle a report point.

    When the dynamics diverge (a NaN or inf logit or error), the evaluation stops at once and the
    final result says so: ``diverged = 1`` and every cross-entropy set to the finite ``penalty``
    (default :func:`default_penalty`), so the search can rank the point and go on. A finite score at
    or above the penalty (logits exploding without overflowing) counts as diverged too, so that a
    failed point never ranks below a blown-up one and the samplers never see astronomically large
    values. ``starts(index, x)`` may hand over the batch's precomputed timestep 0 (or None).
    ``sums``: running sums to continue from (a trial resumed from its checkpoint); updated in place.
    """
    start = time.perf_counter()
    device = next(net.parameters()).device
    total = len(images)
    sums = sums or RunningSums(timesteps, net.num_pcoders)
    points = sorted({p for p in report_at if sums.seen < p < total} | {total})
    chunk_start = sums.seen
    for chunk_end in points:
        for i in range(chunk_start, chunk_end, batch_size):
            j = min(i + batch_size, chunk_end)
            if not sums.add(net, images[i:j].to(device, non_blocking=True), labels[i:j].to(device, non_blocking=True),
                            hparams, starts(i, images[i:j]) if starts else None):
                ce0, correct0 = _feedforward(net, images[sums.seen:], labels[sums.seen:], batch_size, device)
                yield sums.metrics(total, penalty, start, diverged=(ce0, correct0))
                return
        chunk_start = chunk_end
        metrics = sums.metrics(total, penalty, start)
        yield metrics
        if metrics["final"]:  # every image scored, or a running score already at the penalty
            return


class RunningSums:
    """Running sums of a trial's evaluation (float64, on the CPU); :meth:`state` and
    :meth:`from_state` carry them through a checkpoint (a paused trial resumes where it was)."""

    def __init__(self, timesteps: int, num_pcoders: int) -> None:
        self.timesteps = timesteps
        self.ce = torch.zeros(timesteps + 1, dtype=torch.float64)
        self.correct = torch.zeros(timesteps + 1, dtype=torch.float64)
        self.recon = torch.zeros(timesteps + 1, num_pcoders, dtype=torch.float64)
        self.seen = 0
        self.num_classes: int | None = None
        self.net: PredictiveNet | None = None

    def state(self) -> dict:
        return {"timesteps": self.timesteps, "ce": self.ce.tolist(), "correct": self.correct.tolist(),
                "recon": self.recon.tolist(), "seen": self.seen, "num_classes": self.num_classes}

    @classmethod
    def from_state(cls, state: dict) -> RunningSums:
        sums = cls(int(state["timesteps"]), len(state["recon"][0]))
        sums.ce, sums.correct, sums.recon = (torch.tensor(state[k], dtype=torch.float64)
                                             for k in ("ce", "correct", "recon"))
        sums.seen, sums.num_classes = int(state["seen"]), state["num_classes"]
        return sums

    def add(self, net: PredictiveNet, x: Tensor, y: Tensor, hparams: Hyperparameters, first: object | None) -> bool:
        """Score one batch; False (nothing added) when the dynamics diverged on it."""
        self.net = net
        timesteps = self.timesteps
        try:
            kwargs = {} if first is None else {"start": first}
            result = net.run(x, timesteps, hparams, return_states=True, **kwargs)
        except RuntimeError as exc:  # e.g. an alpha so large that alpha * s_n overflows float32
            if "overflow" not in str(exc):
                raise
            return False
        logits = result.logits.float()
        self.num_classes = logits.shape[-1]
        if not (torch.isfinite(logits).all() and torch.isfinite(result.errors).all()):
            return False
        ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(timesteps + 1), reduction="none")
        self.ce += ce.view(timesteps + 1, -1).sum(1).double().cpu()
        self.correct += (logits.argmax(-1) == y).sum(1).double().cpu()
        self.recon += result.errors.double().sum(2).cpu()  # errors: [T+1, N, B]
        self.seen += len(y)
        return True

    def metrics(self, total: int, penalty: float | None, start: float,
                diverged: tuple[float, float] | None = None) -> dict[str, float]:
        counts = torch.full((self.timesteps + 1,), float(self.seen), dtype=torch.float64)
        ce_sum, correct = self.ce.clone(), self.correct.clone()
        if diverged is not None:  # timestep 0 is the feedforward pass, measured before the dynamics diverged
            ce_sum[0] += diverged[0]
            correct[0] += diverged[1]
            counts[0] = total
        num_classes = self.num_classes or output_classes(self.net)
        metrics = _metrics(ce_sum, correct, self.recon, counts, self.timesteps, diverged is not None, penalty,
                           num_classes, start)
        metrics["total_images"] = float(total)
        metrics["final"] = float(bool(metrics["diverged"]) or self.seen >= total)
        return metrics


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
    metrics.update({at_timestep("ce", t): float(v) for t, v in enumerate(ce)})
    metrics.update({at_timestep("accuracy", t): float(v) for t, v in enumerate(acc)})
    metrics.update({recon_error(n): float(v) for n, v in enumerate(errors, start=1)})
    metrics.update({at_timestep(recon_error(n), t): float(per_t[t, n - 1]) for n in range(1, len(errors) + 1)
                    for t in range(timesteps + 1)})
    metrics["num_images"] = float(seen)
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics
