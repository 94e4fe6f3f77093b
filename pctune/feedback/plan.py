"""What a feedback training is, independent of how many processes run it: the plan, the held-out
split, the order of the images in each epoch and each worker's share of a batch.

The rule across worker counts: ``batch_size`` is the **global** batch. Each epoch's order is a
permutation seeded by (seed, epoch); global batch ``k`` is its ``k``-th slice, and worker ``r`` of ``N``
takes the ``r``-th of ``N`` near-equal contiguous parts of it. Each worker weights its loss by its share
of the batch (``N * n_r / B``), so DDP's average of the workers' gradients is exactly the gradient of
the global batch's mean loss: the same step as one process, so the learning rate does not change with
the number of workers. Augmentation is a function of (seed, epoch, image) (:class:`SeededImages`), so
the crops do not depend on which process loads an image either.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pctune.errors import PctuneError

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainPlan:
    epochs: int
    batch_size: int  # global, across workers
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    val_fraction: float = 0.1  # of the folder's images, held out (seeded) to measure the reconstruction
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: at epoch ends only)
    patience: int = 0  # epochs without a better validation loss before stopping (0: never stop early)
    precision: str = "fp32"  # autocast on a GPU: bf16 or fp16

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PctuneError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0 <= self.val_fraction < 1:
            raise PctuneError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("checkpoint_every", "patience"):
            if getattr(self, name) < 0:
                raise PctuneError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")

    def record(self) -> dict[str, Any]:
        return asdict(self)

    def differences(self, recorded: dict[str, Any]) -> list[str]:
        """What a checkpoint's plan fixed that this one changes (all but epochs, patience, checkpoint_every
        and precision: those a resume may change)."""
        fixed = ("batch_size", "lr", "weight_decay", "seed", "val_fraction")
        return [f"{k} {recorded.get(k)!r} -> {getattr(self, k)!r}" for k in fixed
                if recorded.get(k) != getattr(self, k)]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) image indices: a seeded draw of ``round(n * val_fraction)`` images (at least
    one when the fraction is not 0), the same for every worker count and every resume."""
    held = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if held >= n:
        raise PctuneError(f"{n} images cannot be split into training and a held-out {val_fraction:.0%}")
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def global_batches(indices: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Epoch ``epoch``'s global batches: ``indices`` permuted by (seed, epoch), cut into ``batch_size``."""
    order = indices[np.random.default_rng([seed, epoch]).permutation(len(indices))]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def share(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Worker ``rank``'s contiguous part of a global batch."""
    return np.array_split(batch, world)[rank]


class SeededImages(torch.utils.data.Dataset):
    """``dataset[i]`` with the torch RNG seeded by (seed, epoch, i) around it: a random crop or flip is
    the same in any process, any worker count and any resume (the caller's RNG is left as it was)."""

    def __init__(self, dataset, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{self.seed}/{self.epoch}/{index}".encode()))
            return self.dataset[int(index)]
