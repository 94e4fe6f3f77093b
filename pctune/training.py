"""Feedback (decoder) training, paper Eq. 3: with the backbone frozen, every decoder learns to
reconstruct the representation below it after one feedforward pass (no recurrence)."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pctune import interrupts
from pctune.errors import Interrupted, PctuneError
from pctune.models.weights import feedback_payload
from pctune.pc.network import PredictiveNet
from pctune.utils import Log, atomic_torch_save, print_line


class DecoderStack(torch.nn.Module):
    """The decoders as one module: ``forward(reps)`` is every pcoder's prediction of the layer below
    from its representation. (What DDP wraps: its gradient hooks need the forward to go through it.)"""

    def __init__(self, decoders: torch.nn.ModuleList) -> None:
        super().__init__()
        self.decoders = decoders

    def forward(self, reps: list[Tensor]) -> list[Tensor]:
        return [decoder(rep) for decoder, rep in zip(self.decoders, reps, strict=True)]


def reconstruction_losses(net: PredictiveNet, images: Tensor, decoders: torch.nn.Module | None = None) -> Tensor:
    """Per pcoder, the mean squared error of its decoder's prediction of the layer below, after one
    feedforward pass; the decoders are differentiable, the backbone is not. ``decoders``: the
    :class:`DecoderStack` of ``net`` to run them through (a DDP wrapper of it), by default a new one."""
    inputs = [images]
    with torch.no_grad():
        for encoder in net.encoders:
            inputs.append(encoder(inputs[-1]))
    predictions = (decoders or DecoderStack(net.decoders))(inputs[1:])
    return torch.stack([torch.nn.functional.mse_loss(p.float(), below.float())
                        for p, below in zip(predictions, inputs[:-1], strict=True)])


def train_feedback(
    net: PredictiveNet,
    batches: Callable[[], Iterable],
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    device: str | torch.device | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Log = print_line,
) -> list[dict]:
    """Train ``net.decoders`` on the summed reconstruction loss for ``epochs`` epochs.

    ``batches()`` yields ``images`` or ``(images, labels)`` for one epoch. With ``checkpoint_dir``,
    a checkpoint (decoders, optimizer, history) is written after every epoch to ``last.pt``, and
    ``resume=True`` continues from it. Returns the per-epoch history of mean losses per pcoder.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net.to(device).eval()
    net.decoders.requires_grad_(True)
    optimizer = torch.optim.Adam(net.decoders.parameters(), lr=lr, weight_decay=weight_decay)
    history: list[dict] = []
    checkpoint = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    if resume:
        history = _resume(net, optimizer, checkpoint, log)
    try:
        with interrupts.deferred():  # a signal stops the loop at the next batch, never mid-checkpoint
            for epoch in range(len(history) + 1, epochs + 1):
                with _stops_as_interrupted(net, epoch, epochs, history, checkpoint):
                    history.append(_epoch(net, optimizer, batches(), device, epoch, epochs, progress))
                log(_summary(history[-1]))
                if checkpoint is not None:
                    _save(net, optimizer, history, checkpoint)
    finally:
        net.decoders.requires_grad_(False)
    return history


@contextlib.contextmanager
def _stops_as_interrupted(net: PredictiveNet, epoch: int, epochs: int, history: list, checkpoint: Path | None):
    """Ctrl-C or SIGTERM during an epoch: :class:`Interrupted`, naming the checkpoint that ``--resume``
    continues from (the epoch under way is lost, the finished ones are in it)."""
    try:
        yield
    except (KeyboardInterrupt, RuntimeError) as exc:
        # SIGTERM to the process group also reaches the DataLoader's workers, which torch lets die: the
        # loader's "worker killed by signal" is then this stop, not a failure
        if isinstance(exc, RuntimeError) and not interrupts.requested():
            raise
        kept = (f"{checkpoint} holds epoch {len(history)}" if checkpoint is not None and checkpoint.is_file()
                else "no epoch finished")
        raise Interrupted(f"the training of {net.name} stopped in epoch {epoch} of {epochs}; {kept}") from None


def _epoch(net, optimizer, batches, device, epoch: int, epochs: int, progress: bool) -> dict:
    start = time.perf_counter()
    totals = torch.zeros(net.num_pcoders, dtype=torch.float64)
    count = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    with stops_blocked():  # the loader's worker processes start here and inherit the mask
        batches = iter(batches)
    bar = tqdm(batches, total=total, desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False)
    for batch in bar:
        interrupts.check()  # a stop asked for under interrupts.deferred(): between two steps
        images = batch[0] if isinstance(batch, list | tuple) else batch
        images = images.to(device, non_blocking=True)
        losses = reconstruction_losses(net, images)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        totals += losses.detach().double().cpu() * len(images)
        count += len(images)
        bar.set_postfix(loss=f"{losses.sum().item():.4g}")
    if count == 0:
        raise PctuneError("the training data yielded no images")
    per_pcoder = (totals / count).tolist()
    return {"epoch": epoch, "loss": sum(per_pcoder), "pcoder_losses": per_pcoder, "images": count,
            "seconds": time.perf_counter() - start}


@contextlib.contextmanager
def stops_blocked():
    """SIGINT and SIGTERM held back while a DataLoader forks its workers: they inherit the blocked mask, so
    a stop sent to the whole process group (Ctrl-C, ``timeout``, Kubernetes) reaches this process alone,
    which stops its workers itself. (torch lets a worker die of SIGTERM, and the loader then fails with
    "worker killed by signal" in the middle of starting the next one.) A held signal arrives on exit."""
    stops = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _summary(record: dict) -> str:
    parts = " ".join(f"pc{i}={v:.4g}" for i, v in enumerate(record["pcoder_losses"], start=1))
    return f"epoch {record['epoch']}: loss {record['loss']:.4g} ({parts}) [{record['seconds']:.1f}s]"


def _save(net: PredictiveNet, optimizer, history: list[dict], path: Path) -> None:
    atomic_torch_save(feedback_payload(net, optimizer=optimizer.state_dict(), history=history), path)


def _resume(net: PredictiveNet, optimizer, path: Path | None, log) -> list[dict]:
    if path is None:
        raise PctuneError("resume needs a checkpoint directory")
    if not path.is_file():
        log(f"no checkpoint at {path}: starting from scratch")
        return []
    state = load_training_checkpoint(path, net.name)
    net.decoders.load_state_dict(state["decoders"])
    optimizer.load_state_dict(state["optimizer"])
    history = list(state["history"])
    log(f"resumed from {path} after epoch {len(history)}")
    return history


def load_training_checkpoint(path: Path, model: str) -> dict:
    """A train-feedback checkpoint (``last.pt``) of ``model``, or a one-line error saying what it is not."""
    from pctune.models.backbones import load_checkpoint

    state = load_checkpoint(path)
    if not isinstance(state, dict) or not {"model", "decoders", "optimizer", "history"} <= set(state):
        raise PctuneError(f"{path}: not a train-feedback checkpoint (delete it, or run without --resume)")
    if state.get("model") != model:
        raise PctuneError(f"{path} was trained for {state.get('model')!r}, not {model!r}")
    return state
