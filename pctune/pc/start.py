"""What a run returns, and timestep 0 computed once for many runs.

Timestep 0 is the feedforward sweep: e_n(0) = f_n(e_{n-1}(0)), then p_n(0), G_n(0) and eps_n(0) from
the decoders. None of it depends on the coefficients (beta, lambda, alpha), so a hyperparameter
search, which runs thousands of configurations on the same images, can compute it once per image
batch (``PredictiveNet.timestep_zero``) and hand it to every run (``run(..., start=...)``): each run
then skips the encoders' first sweep, one decoder pass with its vector-Jacobian product per pcoder
and the head's first pass, and returns bit-identical numbers.

The cost is memory: a :class:`TimestepZero` holds, per image, every pcoder's representation, its
prediction (the size of the representation below it, the image for the first pcoder) and its error
gradient (the size of the representation), about three times the encoders' activations
(``nbytes()``; e.g. PVGG16 at 64x64 pixels, float32: about 6 MB per image). Under autocast the
tensors are in the reduced precision the run would have used.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from pctune.errors import PctuneError


@dataclass
class RunResult:
    """What ``run(..., return_states=True)`` returns."""

    logits: Tensor  # [T+1, B, classes]
    reconstructions: Tensor  # [T+1, B, *image]: the first decoder's prediction of the input
    errors: Tensor  # [T+1, N, B]: eps_n(t) per pcoder and image
    representations: list[list[Tensor]] | None = None  # [t][n]: e_n(t), with return_representations

    def float(self) -> RunResult:
        """Every tensor in float32 (the run's results under autocast)."""
        reps = None if self.representations is None else [[r.float() for r in s] for s in self.representations]
        return RunResult(self.logits.float(), self.reconstructions.float(), self.errors.float(), reps)


@dataclass
class TimestepZero:
    """Timestep 0 of ``PredictiveNet.run`` for one batch (``PredictiveNet.timestep_zero``); pass it
    as ``run(x, ..., start=...)`` with the same ``x`` for any coefficients. Runs never modify it."""

    reps: list[Tensor]  # [n]: e_n(0), [B, *rep_n]
    preds: list[Tensor]  # [n]: p_n(0) = g_n(e_n(0)), [B, *rep_{n-1}] (the image for n = 0)
    grads: list[Tensor]  # [n]: G_n(0) = d eps_n / d e_n, for every pcoder, [B, *rep_n]
    errors: list[Tensor]  # [n]: eps_n(0) per image, [B]
    logits: Tensor  # [B, classes]: the head's output at timestep 0
    scales: list[float] | None = None  # s_n, when gradient scaling is on
    autocast: torch.dtype | None = None  # the precision it was computed in

    @property
    def batch_size(self) -> int:
        return self.logits.shape[0]

    def tensors(self) -> list[Tensor]:
        return [*self.reps, *self.preds, *self.grads, *self.errors, self.logits]

    def nbytes(self) -> int:
        """Bytes of all the tensors (a tensor that shares another's memory is counted again)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def check_fits(self, x: Tensor, grad_mode: str, autocast: torch.dtype | None, num_pcoders: int) -> None:
        """Raise unless a run on ``x`` with these settings can start from this."""
        if grad_mode != "none":
            raise PctuneError(f"start (a precomputed timestep 0) is for inference only, not grad_mode={grad_mode!r}")
        if len(self.reps) != num_pcoders or self.batch_size != x.shape[0] or self.logits.device != x.device:
            raise PctuneError(f"start ({len(self.reps)} pcoders, batch {self.batch_size} on {self.logits.device}) "
                              f"does not fit this network's {num_pcoders} and x ({x.shape[0]} on {x.device})")
        if self.autocast != autocast:
            raise PctuneError(f"start was computed with autocast={self.autocast}, this run uses {autocast}")

    def _map(self, fn) -> TimestepZero:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("reps", "preds", "grads", "errors"):
            values[name] = [fn(t) for t in values[name]]
        values["logits"] = fn(self.logits)
        return TimestepZero(**values)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TimestepZero:
        """A copy on ``device`` (the tensors themselves when they are there already)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TimestepZero:
        """A CPU copy in page-locked memory, for fast asynchronous ``to(cuda, non_blocking=True)``."""
        return self._map(lambda t: t.cpu().pin_memory())


def compute_timestep_zero(net: nn.Module, x: Tensor, autocast: torch.dtype | None) -> TimestepZero:
    """The feedforward sweep of ``PredictiveNet`` ``net`` on ``x``, as ``run`` computes it in
    inference (the caller sets up no_grad, autocast and the memory format as ``run`` does)."""
    encoders, head, _ = net._pieces("none")
    reps, preds, grads, errors, scales = [], [], [], [], []
    below = x
    for n, encoder in enumerate(encoders):
        rep = encoder(below)
        if net.gradient_scaling:
            scales.append(net._scale(n, rep, below))
        pred, grad, diff = net._decoder_plan(n).forward_vjp(rep, below, 2.0 / below[0].numel())
        reps.append(rep)
        preds.append(pred)
        grads.append(grad)
        errors.append(diff.square().flatten(1).mean(1))
        below = rep
    return TimestepZero(reps, preds, grads, errors, head(below), scales if net.gradient_scaling else None,
                        autocast)
