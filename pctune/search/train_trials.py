"""Trials that train (issue 26): a Ray Tune function trainable that trains a CNN-F for up to
``epochs`` epochs and reports its validation objective after every epoch, the fidelity being the
epochs trained (:data:`EPOCH`, what ASHA reads as time).

Every report carries a Tune checkpoint of the epoch (weights, optimizer, epochs done), so a trial
that Tune restores (its worker was killed, ``max_failures``) or resumes (a paused trial, a resumed
experiment) continues after its last finished epoch instead of training from the start; the batch
order of epoch e is seeded by (seed, e) alone, so a resumed trial trains exactly as an undisturbed one.
Each epoch trained is also appended to ``epochs.log`` in the trial's folder (epoch, pid), the record
that tests read to see that no epoch was trained twice.

The validation objective is the Predify searches' own: mean cross-entropy over the iterations 1..T
(``test_iterations``) on fixed noisy validation images (:func:`validate`).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pctune.metrics import METRIC, at_timestep
from pctune.models.cnnf import CNNFSpec
from pctune.pc.cnnf import CNNF, train_epoch
from pctune.search.trainable import set_worker_threads

EPOCH = "epoch"  # a training trial's fidelity: epochs trained
STATE_FILE = "state.pt"
EPOCHS_LOG = "epochs.log"

#: a training trial's hyperparameters when its config does not set them (the authors' choices where
#: they apply to the demo: reconstruction weight 0.1, residual parameter 0.1, 2 iterations while training)
DEFAULTS = {"lr": 1e-3, "train_iterations": 2, "reconstruction_weight": 0.1, "test_iterations": 4}


@dataclass(frozen=True)
class TrainPayload:
    """What every training trial of a search shares (the arrays are one ObjectRef)."""

    spec: CNNFSpec
    data_ref: Any  # ObjectRef of {"train_images", "train_labels", "val_images", "val_labels"}: np.ndarray
    epochs: int
    batch_size: int = 64
    seed: int = 0
    weight_decay: float = 5e-4


def trial_hparams(config: dict, spec: CNNFSpec) -> dict:
    """The config's hyperparameters over :data:`DEFAULTS` and the spec's ``ind`` / ``res``."""
    out = {**DEFAULTS, "ind": spec.ind, "res": spec.res, **config}
    out["ind"], out["train_iterations"], out["test_iterations"] = (int(out["ind"]), int(out["train_iterations"]),
                                                                  int(out["test_iterations"]))
    return out


def build(spec: CNNFSpec, hparams: dict, seed: int) -> CNNF:
    """The untrained network of a trial: the spec's blocks, seeded weights, the trial's ind and res."""
    torch.manual_seed(seed)
    return CNNF(spec.blocks, ind=hparams["ind"], res=float(hparams["res"]), name=spec.name,
                input_size=spec.input_size)


def optimizer_for(net: CNNF, hparams: dict, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(net.parameters(), lr=float(hparams["lr"]), weight_decay=weight_decay)


def validate(net: CNNF, images: torch.Tensor, labels: torch.Tensor, iterations: int,
             batch_size: int = 250) -> dict[str, float]:
    """``mean_ce`` (cross-entropy averaged over the iterations 1..T), ``ce_t<t>`` and ``accuracy_t<t>``
    for t = 0..T, on ``images`` in batches."""
    net.eval()
    ce = torch.zeros(iterations + 1, dtype=torch.float64)
    correct = torch.zeros(iterations + 1, dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        logits = net.run(images[start:start + batch_size], iterations)  # [T+1, B, C]
        target = labels[start:start + batch_size]
        for t in range(iterations + 1):
            ce[t] += F.cross_entropy(logits[t], target, reduction="sum").double()
            correct[t] += (logits[t].argmax(-1) == target).sum()
    ce, correct = ce / len(images), correct / len(images)
    metrics = {METRIC: float(ce[1:].mean()) if iterations else float(ce[0])}
    for t in range(iterations + 1):
        metrics[at_timestep("ce", t)], metrics[at_timestep("accuracy", t)] = float(ce[t]), float(correct[t])
    return metrics


def train_trial(config: dict, payload: TrainPayload) -> None:
    """The Ray Tune function trainable: train epoch by epoch, report and checkpoint after each."""
    import ray
    from ray import tune

    set_worker_threads()
    data = {name: torch.from_numpy(np.array(array)) for name, array in ray.get(payload.data_ref).items()}
    hparams = trial_hparams(config, payload.spec)
    net = build(payload.spec, hparams, payload.seed)
    optimizer = optimizer_for(net, hparams, payload.weight_decay)
    done = _restore(tune.get_checkpoint(), net, optimizer)
    trial_dir = Path(tune.get_context().get_trial_dir())
    for epoch in range(done, payload.epochs):
        losses = train_epoch(net, optimizer, data["train_images"], data["train_labels"],
                             iterations=hparams["train_iterations"], batch_size=payload.batch_size,
                             reconstruction_weight=float(hparams["reconstruction_weight"]),
                             generator=torch.Generator().manual_seed(payload.seed * 1000 + epoch))
        with (trial_dir / EPOCHS_LOG).open("a") as log:
            log.write(f"{epoch + 1} {os.getpid()}\n")
        metrics = validate(net, data["val_images"], data["val_labels"], hparams["test_iterations"])
        if not math.isfinite(metrics[METRIC]):
            metrics[METRIC] = float("inf")  # a diverged trial ranks last instead of failing the search
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), EPOCH: epoch + 1},
                       Path(folder) / STATE_FILE)
            tune.report({**metrics, EPOCH: epoch + 1, **{f"train_{k}": v for k, v in losses.items()}},
                        checkpoint=tune.Checkpoint.from_directory(folder))


def _restore(checkpoint, net: CNNF, optimizer: torch.optim.Optimizer) -> int:
    """Load a trial's last checkpoint into ``net`` and ``optimizer``; the epochs it had finished (0: none)."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, weights_only=True)
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state[EPOCH])


def load_trained(spec: CNNFSpec, config: dict, checkpoint_dir: str | Path, seed: int = 0) -> CNNF:
    """A trial's network as its checkpoint in ``checkpoint_dir`` left it."""
    net = build(spec, trial_hparams(config, spec), seed)
    net.load_state_dict(torch.load(Path(checkpoint_dir) / STATE_FILE, weights_only=True)["model"])
    return net.eval()
