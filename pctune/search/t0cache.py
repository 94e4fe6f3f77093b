"""Timestep 0, computed once per worker and image batch, reused by every later trial.

Timestep 0 (the feedforward sweep, every pcoder's prediction and error gradient) does not depend on
beta, lambda or alpha, so for the same weights and the same images it is the same in every trial. A
worker keeps the :class:`pctune.pc.start.TimestepZero` of each batch it scored within a memory budget
(``search.cache_gb``): on the trial's device first, then (CUDA only) in pinned host memory, copied back
for each use; a batch that fits in neither is recomputed, as without the cache. Runs started from a
cached timestep 0 are bit-identical to runs that compute it (tests/test_timestep_zero.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pctune.pc.network import PredictiveNet

GIB = 1024 ** 3


class TimestepZeroCache:
    """One worker's timestep-0 results of one search, keyed by (image set, first image, batch length)."""

    def __init__(self) -> None:
        self.entries: dict[tuple, object] = {}
        self.prefix: tuple | None = None
        self.used = {"device": 0, "host": 0}

    def clear(self) -> None:
        self.entries.clear()
        self.used = {"device": 0, "host": 0}

    def starts(self, net: PredictiveNet, prefix: tuple, budget_gb: float, counter: dict[str, int],
               images: str = "images") -> Callable[[int, Tensor], object]:
        """The ``starts(index, x)`` function of :func:`pctune.search.objective.score_chunks` for the
        search ``prefix`` (model, data, device) and its image set ``images`` (a robust objective's
        condition): a cached timestep 0, else a fresh one, kept if the budget allows.
        ``counter["cached"]`` counts the images served from the cache."""
        if prefix != self.prefix:  # another search's model or images: start over
            self.clear()
            self.prefix = prefix
        budget = int(budget_gb * GIB)
        device = next(net.parameters()).device

        def start(index: int, x: Tensor) -> object:
            key = (images, index, len(x))
            hit = self.entries.get(key)
            if hit is not None:
                counter["cached"] += len(x)
                return hit if _on(hit, device) else hit.to(device, non_blocking=True)
            fresh = net.timestep_zero(x.to(device, non_blocking=True))
            self._keep(key, fresh, device, budget)
            return fresh

        return start

    def _keep(self, key: tuple, fresh, device: torch.device, budget: int) -> None:
        size = fresh.nbytes()
        if self.used["device"] + size <= budget and _fits_on(device, size):
            self.entries[key] = fresh
            self.used["device"] += size
        elif device.type == "cuda" and self.used["host"] + size <= budget:
            self.entries[key] = fresh.pin_memory()
            self.used["host"] += size


def _on(start, device: torch.device) -> bool:
    return start.logits.device == device


def _fits_on(device: torch.device, size: int) -> bool:
    """Room on a CUDA device for ``size`` more bytes, with a quarter of its free memory left for the run."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return size <= 0.75 * free


CACHE = TimestepZeroCache()
