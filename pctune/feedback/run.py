"""``pctune train-feedback``: the checks, the image folder and its held-out split, the MLflow run, the
training (in this process for one worker, on Ray Train for more: :mod:`pctune.feedback.cluster`) and
the weights, registered as ``<model>-feedback`` (:mod:`pctune.tracking.feedback`).

``OUT`` holds ``last.pt`` (the last checkpoint, kept by the driver whatever the number of workers:
``--resume`` continues from it), ``mlflow-run.json`` (the run a resume reopens) and at the end
``feedback.pt``: the decoders of the epoch with the lowest held-out loss (of the last epoch without a
held-out split).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pctune import interrupts
from pctune.errors import Interrupted, PctuneError
from pctune.feedback.cluster import CHECKPOINT_FILE, FolderSource, Workers
from pctune.feedback.plan import TrainPlan, split_indices
from pctune.models.weights import is_weights_uri, save_feedback_weights
from pctune.pc.network import PredictiveNet
from pctune.tracking.feedback import FeedbackRun, registered_name
from pctune.utils import Log, atomic_torch_save, atomic_write_bytes, print_line

RUN_FILE = "mlflow-run.json"
WEIGHTS_FILE = "feedback.pt"


@dataclass
class TrainRequest:
    """What ``pctune train-feedback`` was asked (its flags, checked)."""

    model: str
    data: str
    out: Path | None  # default: runs/feedback/<the model's name>
    plan: TrainPlan
    workers: Workers = field(default_factory=Workers)
    image_size: int | None = None
    pretrained: bool = False
    backbone_weights: str | None = None
    feedback_weights: str | None = None
    device: str | None = None
    resume: bool = False
    address: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None


def train(request: TrainRequest, log: Log = print_line) -> dict[str, Any]:
    """Train, track and register; returns {"weights", "version", "history", "best_epoch"}."""
    from pctune.tracking.store import check_reachable, resolve_tracking_uri

    if _on_ray(request):
        _check_workers(request.workers, request.address, log)  # a local Ray's resources, before anything starts
    uri = resolve_tracking_uri(request.tracking_uri)
    check_reachable(uri)
    net = _model(request, uri)
    request = replace(request, out=Path(request.out or Path("runs") / "feedback" / net.name))
    _check_output(request.out)
    size = request.image_size or net.input_size[-1]
    from pctune.models.registry import model_classes

    source = FolderSource(str(Path(request.data).resolve()), size, model_classes(net, count=False))
    images, val_images = source.open()
    if len(images) == 0:
        raise PctuneError(f"{request.data}: no images")
    split = split_indices(len(images), request.plan.val_fraction, request.plan.seed)
    start = _resume_point(request, net.name, log) if request.resume else None
    run = _open_run(request, uri, net, source, len(split[0]), len(split[1]))
    log(f"training {net.num_pcoders} decoders of {net.name} on {len(split[0])} images from {request.data} "
        f"(held out: {len(split[1])}), {request.workers.count} worker(s), global batch {request.plan.batch_size}; "
        f"checkpoints in {request.out}; MLflow run {run.run_id} at {uri}")
    reporter = _Reporter(request.out, run, request.plan.epochs, log)
    with _stops_as_interrupted(net.name, request.out, request.plan.epochs, run):
        final = _fit(request, net, (images, val_images), source, split, start, reporter, log)
    return _finish(request, net, final, run, log)


def _model(request: TrainRequest, uri: str) -> PredictiveNet:
    from pctune.models import create_model

    feedback = request.feedback_weights
    if is_weights_uri(feedback):  # start from weights MLflow holds
        from pctune.data.demo import cache_root
        from pctune.tracking.weights import fetch_named_weights

        feedback = str(fetch_named_weights(feedback, uri, cache_root())[1])
    net = create_model(request.model, pretrained=request.pretrained, backbone_weights=request.backbone_weights,
                       feedback_weights=feedback)
    if net.input_size[0] != 3:  # an image folder is read as RGB
        raise PctuneError(f"{request.model} takes {net.input_size[0]}-channel images, but train-feedback reads image "
                          "folders as RGB (3 channels)")
    return net


def _check_output(out: Path) -> None:
    """The files train-feedback writes (OUT/last.pt at every checkpoint, OUT/feedback.pt at the end) can be
    written: checked before training, not after it."""
    if out.exists() and not out.is_dir():
        raise PctuneError(f"--out: {out} is not a directory")
    for name in (CHECKPOINT_FILE, WEIGHTS_FILE, RUN_FILE):
        if (out / name).exists() and not (out / name).is_file():
            raise PctuneError(f"--out: {out / name} is not a file (train-feedback writes its checkpoint there): "
                              "remove it or pass another --out")


def _resume_point(request: TrainRequest, model: str, log: Log) -> dict | None:
    path = request.out / CHECKPOINT_FILE
    if not path.is_file():
        log(f"no checkpoint at {path}: starting from scratch")
        return None
    from pctune.training import load_training_checkpoint

    state = load_training_checkpoint(path, model)
    log(f"resumed from {path} {_position(state)}")
    return state


def _position(state: dict) -> str:
    position = state.get("position") or {}
    if position.get("step"):
        return f"at epoch {position['epoch']} step {position['step']}"
    return f"after epoch {len(state.get('history', []))}"


def _open_run(request: TrainRequest, uri: str, net: PredictiveNet, source: FolderSource, train: int,
              held: int) -> FeedbackRun:
    """The training's MLflow run: the one ``OUT/mlflow-run.json`` names on a resume, else a new one."""
    recorded = request.out / RUN_FILE
    run_id = None
    if request.resume and recorded.is_file():
        with contextlib.suppress(ValueError, OSError, KeyError):
            run_id = json.loads(recorded.read_text())["run_id"]
    run = FeedbackRun(uri, request.experiment or registered_name(net.name), run_id)
    plan = request.plan
    run.start(net.name, {"model": net.name, "backbone_weights": request.backbone_weights or
                         ("pretrained" if request.pretrained else "none"), "data": source.root,
                         "data_digest": _folder_digest(source.root), "train_images": train, "val_images": held,
                         "image_size": source.image_size, "epochs": plan.epochs, "lr": plan.lr,
                         "weight_decay": plan.weight_decay, "global_batch": plan.batch_size,
                         "workers": request.workers.count, "precision": plan.precision, "seed": plan.seed,
                         "feedback_weights_start": request.feedback_weights or "none"})
    request.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(recorded, json.dumps({"run_id": run.run_id, "tracking_uri": uri}).encode())
    return run


def _folder_digest(root: str) -> str:
    """A digest of the folder's file names and sizes (the contents of ImageNet are too many to read)."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            h.update(f"{path.relative_to(root)}\0{path.stat().st_size}\n".encode())
    return h.hexdigest()


class _Reporter:
    """On the driver, for every checkpoint: ``OUT/last.pt``, the MLflow metrics, the progress line."""

    def __init__(self, out: Path, run: FeedbackRun, epochs: int, log: Log) -> None:
        self.out, self.run, self.epochs, self.log = out, run, epochs, log
        self.started_at = None

    def __call__(self, checkpoint: dict | None, report: dict) -> None:
        from pctune.feedback.loop import summary

        if self.started_at is not None and report.get("started_at") != self.started_at:
            epoch, step = report["started_at"]
            self.log(f"Ray Train restarted the workers after a failure: training continues from the checkpoint "
                     f"at epoch {epoch} step {step}")
        self.started_at = report.get("started_at")
        # MLflow first, then the checkpoint: a driver killed between the two recomputes those steps after
        # --resume, and the reopened run skips the ones it holds (the other order would leave a gap)
        self.run.log_steps(report.get("step_losses", []))
        record = report.get("record")
        if record:
            self.run.log_epoch(record)
        if checkpoint is not None:
            atomic_torch_save(checkpoint, self.out / CHECKPOINT_FILE)
        if record:  # (a checkpoint inside an epoch is not a line: the progress bar shows the steps)
            self.log(summary(record, self.epochs))


def _fit(request: TrainRequest, net, datasets, source: FolderSource, split, start, reporter, log) -> dict[str, Any]:
    import torch

    if not _on_ray(request):
        from pctune.feedback.loop import train_decoders

        device = torch.device(request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with interrupts.deferred():  # a signal stops the loop at the next step, never mid-checkpoint
            return train_decoders(net, *datasets, split, request.plan, save=reporter, start=start,
                                  device=device, loader_workers=request.workers.loader_workers, log=lambda _m: None)
    import ray

    from pctune import localray
    from pctune.feedback import cluster
    from pctune.models.registry import get_spec
    from pctune.models.state import state_arrays
    from pctune.search.raycluster import connect

    connect(request.address, log)
    try:
        _check_workers(request.workers, request.address, log)  # a cluster's, once joined
        return cluster.fit(get_spec(request.model), ray.put(state_arrays(net)), source, request.plan,
                           request.workers, request.out.resolve(), start, reporter)
    finally:
        localray.shutdown()


def _on_ray(request: TrainRequest) -> bool:
    """Ray Train for more than one worker or a named cluster; one worker trains in this process."""
    return request.workers.count > 1 or bool(request.address)


def _check_workers(workers: Workers, address: str | None, log: Log) -> None:
    from pctune.search.raycluster import check_fits, ray_address

    check_fits({"CPU": workers.count, "GPU": workers.count * workers.gpus_per_worker},
               lambda key, want, have: (f"--num-workers {workers.count} needs {want:g} {key}s but the Ray cluster "
                                        f"has {have:g}"), local=ray_address(address) is None, log=log)


@contextlib.contextmanager
def _stops_as_interrupted(model: str, out: Path, epochs: int, run: FeedbackRun) -> Iterator[None]:
    """Ctrl-C or SIGTERM: the MLflow run KILLED and :class:`Interrupted` naming the checkpoint that
    ``--resume`` continues from; a failure: the run FAILED."""
    try:
        yield
    except (KeyboardInterrupt, RuntimeError, Interrupted) as exc:
        # SIGTERM to the process group also reaches the DataLoader's workers, which torch lets die: the
        # loader's "worker killed by signal" is then this stop, not a failure
        if isinstance(exc, RuntimeError) and not interrupts.requested():
            run.stop("FAILED")
            raise
        run.stop("KILLED")
        raise Interrupted(f"the training of {model} stopped {_kept(out / CHECKPOINT_FILE, epochs)}") from None
    except BaseException:
        run.stop("FAILED")
        raise


def _kept(path: Path, epochs: int) -> str:
    """In which epoch the training stopped and what ``path`` holds of it."""
    if not path.is_file():
        return f"in epoch 1 of {epochs}; no epoch finished"
    from pctune.models.backbones import load_checkpoint

    state = load_checkpoint(path)
    done, position = len(state.get("history", [])), state.get("position") or {}
    steps = f" and {position['step']} steps of epoch {done + 1}" if position.get("step") else ""
    return f"in epoch {done + 1} of {epochs}; {path} holds epoch {done}{steps}"


def _finish(request: TrainRequest, net: PredictiveNet, final: dict, run: FeedbackRun, log: Log) -> dict[str, Any]:
    """``OUT/feedback.pt`` (the best epoch's decoders), logged and registered."""
    best = final.get("best")
    net.decoders.load_state_dict(best["decoders"] if best else final["decoders"])
    history = final["history"]
    weights = request.out / WEIGHTS_FILE
    save_feedback_weights(net.cpu(), weights, history=history, best_epoch=best["epoch"] if best else len(history))
    version = run.finish(weights, history, net.name)
    for session in request.out.glob("ray-train-*"):  # Ray Train's copies of the checkpoints: last.pt has the last
        shutil.rmtree(session, ignore_errors=True)
    name = registered_name(net.name)
    chosen = f"epoch {best['epoch']} (lowest held-out loss {best['val_loss']:.4g})" if best else "the last epoch"
    log(f"feedback weights: {weights} from {chosen}; registered as models:/{name}/{version} "
        f"(models:/{name}@latest names the newest version)")
    return {"weights": weights, "version": version, "history": history, "best_epoch": best["epoch"] if best else None,
            "run_id": run.run_id}

