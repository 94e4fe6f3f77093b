"""A search whose trials train (:mod:`pctune.search.train_trials`): Ray Tune with Optuna's TPE over a
CNN-F's training hyperparameters, FIFO or ASHA over epochs, every epoch checkpointed.

Only a trial that trained every epoch can win (:func:`champion`): a trial ASHA stopped early scored
a network trained for fewer epochs, which is not the network the search would hand on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Domain

from pctune.data.noise import add_gaussian_noise
from pctune.metrics import METRIC
from pctune.models.cnnf import CNNFSpec
from pctune.search.callbacks import MAX_FAILURES
from pctune.search.schedulers import SCHEDULERS
from pctune.search.train_trials import EPOCH, TrainPayload, train_trial


def cnnf_space(spec: CNNFSpec) -> dict:
    """CNN-F's training hyperparameters and its test iterations (Tune's search-space objects): the
    learning rate, the iterations while training, the block the feedback reconstructs (``ind``: any
    block but the logits), the residual parameter, the reconstruction loss weight."""
    return {"lr": tune.loguniform(1e-4, 1e-2), "train_iterations": tune.randint(0, 4),
            "ind": tune.choice(list(range(len(spec.blocks) - 1))), "res": tune.uniform(0.0, 0.5),
            "reconstruction_weight": tune.loguniform(0.01, 1.0), "test_iterations": tune.randint(1, 6)}


def training_payload(spec: CNNFSpec, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                     *, epochs: int, sigma: float = 0.5, seed: int = 0, batch_size: int = 64) -> TrainPayload:
    """The arrays in the object store once: the training images, and the validation images with one
    fixed seeded draw of Gaussian noise of ``sigma`` (the same for every trial)."""
    import ray

    arrays = {"train_images": train[0].numpy(), "train_labels": train[1].numpy(),
              "val_images": add_gaussian_noise(val[0], sigma, seed).numpy(), "val_labels": val[1].numpy()}
    return TrainPayload(spec=spec, data_ref=ray.put(arrays), epochs=epochs, batch_size=batch_size, seed=seed)


def run_training_search(payload: TrainPayload, space: dict, *, num_samples: int, storage: str | Path, name: str,
                        scheduler: str = "fifo", seed: int = 0, max_concurrent: int = 2, cpus_per_trial: float = 1,
                        reduction_factor: float = 2, callbacks: Sequence[tune.Callback] = (),
                        max_failures: int = MAX_FAILURES) -> tune.ResultGrid:
    """Run the search (``scheduler``: "fifo", every trial trains every epoch; "asha", stopped at the
    rungs 1, rf, rf^2, ... epochs); returns Tune's results. A ``space`` of sampled values is searched by
    TPE; one of fixed values and ``tune.grid_search`` lists runs them as given."""
    import optuna

    searcher = None  # fixed values and grids: Tune's own variant generator
    if any(isinstance(value, Domain) for value in space.values()):
        searcher = OptunaSearch(metric=METRIC, mode="min", seed=seed,
                                sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True))
    kind = SCHEDULERS[scheduler]
    if kind.pauses_trials:
        raise ValueError(f"scheduler {scheduler!r}: training searches stop trials early (asha) or not (fifo)")
    trial_scheduler = FIFOScheduler()
    if kind.stops_early:
        trial_scheduler = AsyncHyperBandScheduler(time_attr=EPOCH, metric=METRIC, mode="min", max_t=payload.epochs,
                                                  grace_period=1, reduction_factor=reduction_factor)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train_trial, payload=payload), {"cpu": cpus_per_trial}),
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=trial_scheduler, num_samples=num_samples,
                                    max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0, callbacks=list(callbacks),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )
    return tuner.fit()


def epochs_trained(result: tune.Result) -> int:
    return int((result.metrics or {}).get(EPOCH, 0))


def champion(results: tune.ResultGrid, epochs: int) -> tune.Result | None:
    """The best trial among those that trained all ``epochs`` (None when none did)."""
    full = [r for r in results if r.error is None and epochs_trained(r) == epochs
            and np.isfinite(r.metrics.get(METRIC, np.inf))]
    return min(full, key=lambda r: r.metrics[METRIC], default=None)
