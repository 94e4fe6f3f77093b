"""The straightforward implementation of the spec's pseudocode (shared/spec/dynamics.md), the baseline
that ``engine_throughput.py`` measures pctune's engine against.

Written from the pseudocode alone, independent of ``pctune.pc.network``: it borrows only the network's
pieces (``net.encoders``, ``net.decoders``, ``net.head``) as callables. Deliberately plain:

* fp32, eager, no layout changes;
* every pcoder, at every timestep (the last included), evaluates its decoder with autograd enabled
  and calls ``torch.autograd.grad`` of the per-image mean squared error (mean over each image's
  elements, summed over the batch) with respect to its representation;
* nothing is skipped, whatever the coefficients are (alpha = 0, lambda = 0 or beta = 1 included);
* the feedback term uses the prediction the pcoder above made at the previous timestep, and the error
  gradient used at timestep t is the one computed at the end of t - 1;
* with gradient scaling, G is multiplied by s_n (``net.gradient_scales``-style, passed in).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def straightforward_run(
    net,
    x: Tensor,
    timesteps: int,
    beta: Sequence[float],
    lam: Sequence[float],
    alpha: Sequence[float],
    scales: Sequence[float] | None = None,
) -> Tensor:
    """Logits of timesteps 0..T, ``[T+1, B, classes]``."""
    encoders, decoders, head = net.encoders, net.decoders, net.head
    n_pc = len(encoders)
    scales = list(scales) if scales is not None else [1.0] * n_pc
    e: list[Tensor | None] = [None] * n_pc  # representations e_n(t)
    p: list[Tensor | None] = [None] * n_pc  # predictions p_n(t) of e_{n-1}(t)
    g: list[Tensor | None] = [None] * n_pc  # error gradients G_n(t) = d eps_n / d e_n

    def pcoder_error(n: int, target: Tensor) -> None:
        with torch.enable_grad():
            rep = e[n].detach().requires_grad_(True)
            pred = decoders[n](rep)
            eps = (pred - target.detach()).pow(2).flatten(1).mean(dim=1).sum()
            (grad,) = torch.autograd.grad(eps, rep)
        p[n] = pred.detach()
        g[n] = grad

    logits = []
    with torch.no_grad():
        below = x
        for n in range(n_pc):
            e[n] = encoders[n](below)
            pcoder_error(n, below)
            below = e[n]
        logits.append(head(e[n_pc - 1]))
        for _ in range(timesteps):
            below = x
            for n in range(n_pc):
                ff = encoders[n](below)
                if n < n_pc - 1:
                    new = (beta[n] * ff + lam[n] * p[n + 1] + (1.0 - beta[n] - lam[n]) * e[n]
                           - alpha[n] * scales[n] * g[n])
                else:
                    new = beta[n] * ff + (1.0 - beta[n]) * e[n] - alpha[n] * scales[n] * g[n]
                e[n] = new
                pcoder_error(n, below)
                below = e[n]
            logits.append(head(e[n_pc - 1]))
    return torch.stack(logits)
