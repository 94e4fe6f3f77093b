"""train-feedback on Ray Train: ``N`` workers (TorchTrainer; DDP over gloo on CPUs, nccl on GPUs), each
running :func:`pctune.feedback.loop.train_decoders` on its share of every global batch.

- The network reaches the workers once, through the object store (built on the driver with its
  weights, so no worker downloads anything); each worker opens the image folder itself by path (on a
  cluster: shared storage). Ray Data is not used: the order and the shares must be a function of
  (seed, epoch) for one worker and ``N`` workers to take the same steps (:mod:`pctune.feedback.plan`),
  and an ImageFolder read by index gives that with no second copy of the data.
- Every checkpoint goes through ``ray.train.report`` to the storage path (``OUT/ray-train``); a worker
  that dies is replaced by Ray Train (``FailureConfig``) and the group restarts from the last one
  (``ray.train.get_checkpoint``), at the step after it.
- Reports reach the driver through a queue (:class:`_Forward`, Ray Train's callback on its controller),
  so the driver prints progress, logs to MLflow and keeps ``OUT/last.pt`` (what ``--resume`` continues
  from, with any number of workers) as the workers go.
"""

from __future__ import annotations

import queue as _queue
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray.train import UserCallback

from pctune.errors import PctuneError
from pctune.feedback.plan import TrainPlan, split_indices
from pctune.models.spec import ModelSpec
from pctune.utils import first_line

CHECKPOINT_FILE = "last.pt"


@dataclass(frozen=True)
class FolderSource:
    """The image folder every worker opens: its path, crop size and the model's classes."""

    root: str
    image_size: int
    classes: Any = None

    def open(self) -> tuple[Any, Any]:
        """(training images with the train transform, the same images with the val transform)."""
        from pctune.data.folders import image_folder

        return (image_folder(self.root, split="train", image_size=self.image_size, classes=self.classes),
                image_folder(self.root, split="val", image_size=self.image_size, classes=self.classes))


@dataclass(frozen=True)
class Workers:
    count: int = 1
    gpus_per_worker: float = 0
    loader_workers: int = 0


def fit(spec: ModelSpec, state_ref, source: FolderSource, plan: TrainPlan, workers: Workers, storage: Path,
        start: dict | None, on_report: Callable[[dict, dict], None]) -> dict[str, Any]:
    """Train on Ray Train; ``on_report(checkpoint, report)`` runs on the driver for every report (the
    checkpoint as a dict, None for the other ranks' reports). Returns the last checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    reports = Queue()
    config = {"spec": spec, "state": state_ref, "source": source, "plan": plan,
              "loader_workers": workers.loader_workers, "start": ray.put(start) if start else None}
    trainer = TorchTrainer(
        _worker, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if workers.gpus_per_worker else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers.count, use_gpu=bool(workers.gpus_per_worker),
                                     resources_per_worker={"CPU": 1, "GPU": workers.gpus_per_worker}
                                     if workers.gpus_per_worker else {"CPU": 1}),
        run_config=RunConfig(name=f"ray-train-{_session()}", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=[_Forward(reports)]))
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=_run, args=(trainer, outcome), daemon=True)
    thread.start()
    while thread.is_alive() or not reports.empty():
        try:
            checkpoint_dir, report = reports.get(timeout=0.5)
        except _queue.Empty:
            continue
        on_report(_read(checkpoint_dir) if checkpoint_dir else None, report)
    if "error" in outcome:
        raise PctuneError(f"the training failed on the Ray workers: {first_line(outcome['error'])[:400]}")
    return _read(outcome["result"].checkpoint.path)


def _run(trainer, outcome: dict) -> None:
    try:
        outcome["result"] = trainer.fit()
    except Exception as exc:  # Ray Train's TrainingFailedError names the worker's error
        outcome["error"] = exc


def _session() -> str:
    import time

    return time.strftime("%Y%m%d-%H%M%S")


def _read(checkpoint_dir: str) -> dict[str, Any]:
    from pctune.models.backbones import load_checkpoint

    return load_checkpoint(Path(checkpoint_dir) / CHECKPOINT_FILE)


class _Forward(UserCallback):
    """Ray Train's callback (on its controller): every report, once its checkpoint is in storage, onto
    the driver's queue."""

    def __init__(self, reports) -> None:
        self.reports = reports

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self.reports.put((checkpoint.path if checkpoint is not None else None, metrics[0]))



def _worker(config: dict) -> None:
    """One Ray Train worker: the network from the object store, its share of every batch, a report per
    checkpoint (rank 0 writes the checkpoint; every rank reports: the report is collective)."""
    import ray
    import ray.train
    import ray.train.torch

    from pctune.feedback.loop import train_decoders
    from pctune.models.state import model_from_state

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    plan: TrainPlan = config["plan"]
    net = model_from_state(config["spec"], ray.get(config["state"]))
    images, val_images = config["source"].open()
    restarted = ray.train.get_checkpoint()  # a worker group Ray Train restarted after a failure
    if restarted is not None:
        with restarted.as_directory() as folder:
            start = _read(folder)
    else:
        start = ray.get(config["start"]) if config["start"] else None

    def save(checkpoint: dict, report: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                torch.save(checkpoint, Path(tmp) / CHECKPOINT_FILE)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)

    train_decoders(net, images, val_images, split_indices(len(images), plan.val_fraction, plan.seed), plan,
                   save=save, start=start, rank=rank, world=world, device=ray.train.torch.get_device(),
                   loader_workers=config["loader_workers"], progress=False, log=lambda _m: None)
