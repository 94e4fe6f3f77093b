"""The feedback-training loop (paper Eq. 3) as one process of ``world`` runs it: pure PyTorch, with
``torch.distributed`` (DDP over the decoders, sums of the losses) when ``world > 1``.

The loop is the same for one process and for a Ray Train worker; what differs is handed in: the
process's rank, where a checkpoint goes (``save``) and what it starts from (``start``). A checkpoint is
taken at every epoch's end and, with ``plan.checkpoint_every``, every that many steps inside an epoch; it
holds the decoders, the optimizer, the history, the best epoch so far and the position inside the
epoch, so training resumes at the step after it and the epoch's record is the one an uninterrupted
run gives.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pctune import interrupts
from pctune.errors import PctuneError
from pctune.feedback.plan import SeededImages, TrainPlan, global_batches, share
from pctune.models.weights import feedback_payload
from pctune.pc.network import PredictiveNet
from pctune.training import DecoderStack, reconstruction_losses, stops_blocked
from pctune.utils import Log, print_line

#: ``save(checkpoint, report)``: every rank calls it at every checkpoint (Ray Train's report is collective);
#: ``report``: the epoch's record at an epoch's end, else None, plus the steps' losses since the last one
Save = Callable[[dict[str, Any], dict[str, Any]], None]


@dataclass
class Position:
    """Where the training stands: the epoch under way, the global batches of it done, and the sums of its
    losses over those batches (global: every rank holds the same)."""

    epoch: int = 1
    step: int = 0
    totals: list[float] = field(default_factory=list)
    count: int = 0


def train_decoders(net: PredictiveNet, images, val_images, split: tuple[np.ndarray, np.ndarray], plan: TrainPlan, *,
                   save: Save, start: dict | None = None, rank: int = 0, world: int = 1,
                   device: torch.device | str = "cpu", loader_workers: int = 0, progress: bool = True,
                   log: Log = print_line) -> dict[str, Any]:
    """Train ``net.decoders`` by ``plan`` on the ``split[0]`` images of ``images`` (measured on the
    ``split[1]`` images of ``val_images`` after every epoch); returns the last checkpoint."""
    device = torch.device(device)
    net.to(device).eval()
    net.decoders.requires_grad_(True)
    stack = DecoderStack(net.decoders)
    model = torch.nn.parallel.DistributedDataParallel(stack) if world > 1 else stack
    optimizer = torch.optim.Adam(net.decoders.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
    run = _Run(net, model, optimizer, plan, rank, world, device, save)
    run.restore(start, log)
    run.started_at = [run.at.epoch, run.at.step]  # in every report: the driver sees a restart by it
    try:
        for epoch in range(run.at.epoch, plan.epochs + 1):
            if run.stopped_early():
                log(f"early stop: no better validation loss in the last {plan.patience} epochs")
                break
            run.epoch(images, split[0], epoch, loader_workers, progress and rank == 0)
            run.end_epoch(val_images, split[1], log if rank == 0 else (lambda _m: None))
    finally:
        net.decoders.requires_grad_(False)
    return run.checkpoint()


class _Run:
    """One process's training state and its steps."""

    def __init__(self, net, model, optimizer, plan: TrainPlan, rank: int, world: int, device, save: Save) -> None:
        self.net, self.model, self.optimizer, self.plan = net, model, optimizer, plan
        self.rank, self.world, self.device, self.save = rank, world, device, save
        self.at = Position(totals=[0.0] * net.num_pcoders)
        self.history: list[dict] = []
        self.best: dict | None = None
        self.local = torch.zeros(net.num_pcoders, dtype=torch.float64)
        self.local_count = 0
        self.step_losses: list[tuple[int, float]] = []  # (global step, this rank's part of its loss) since the
        # last report
        self.started_at = [1, 0]  # (epoch, step) this session started from
        self.started, self.seen_before = time.perf_counter(), 0  # this session's start of the epoch
        self.autocast = _autocast(plan.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if plan.precision == "fp16" else None

    # -- steps ----------------------------------------------------------------------------------------
    def epoch(self, images, indices: np.ndarray, epoch: int, loader_workers: int, progress: bool) -> None:
        batches = global_batches(indices, self.plan.batch_size, self.plan.seed, epoch)
        if self.at.epoch != epoch:
            self.at = Position(epoch=epoch, totals=[0.0] * self.net.num_pcoders)
        shares = [share(b, self.rank, self.world) for b in batches]
        # an empty share still steps (with weight 0), so that every rank takes part in DDP's reduction
        loader = torch.utils.data.DataLoader(SeededImages(images, self.plan.seed, epoch),
                                             batch_sampler=[(s if len(s) else batches[k][:1]).tolist()
                                                            for k, s in enumerate(shares)][self.at.step:],
                                             num_workers=loader_workers)
        self.started, self.seen_before = time.perf_counter(), self.at.count
        with stops_blocked():  # the loader's worker processes start here and inherit the mask
            steps = iter(loader)
        bar = tqdm(steps, total=len(batches) - self.at.step, desc=f"epoch {epoch}/{self.plan.epochs}",
                   disable=not progress, leave=False, unit="step")
        for k, batch in enumerate(bar, start=self.at.step + 1):
            interrupts.check()  # a stop asked for under interrupts.deferred(): between two steps
            n, size = len(shares[k - 1]), len(batches[k - 1])
            loss = self.step(batch[0] if isinstance(batch, list | tuple) else batch, n, size)
            self.at.step = k
            # (every epoch has as many steps; the global batch's loss is summed across ranks at the report)
            self.step_losses.append(((epoch - 1) * len(batches) + k, loss * n / size))
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            if self.plan.checkpoint_every and k % self.plan.checkpoint_every == 0 and k < len(batches):
                self._carry()
                self.save(self.checkpoint(), {"epoch": epoch, "step": k, "record": None, **self._take_steps()})

    def step(self, images: torch.Tensor, n: int, batch: int) -> float:
        """One optimizer step; this rank's loss weighted by its share of the global batch (module doc of
        :mod:`pctune.feedback.plan`). Returns the loss of this rank's share."""
        images = images.to(self.device, non_blocking=True)
        with self.autocast:
            losses = reconstruction_losses(self.net, images, self.model)
        weighted = losses.sum() * (n * self.world / batch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(weighted).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            weighted.backward()
            self.optimizer.step()
        self.local += losses.detach().double().cpu() * n
        self.local_count += n
        return float(losses.detach().sum())

    # -- epoch ends -----------------------------------------------------------------------------------
    def end_epoch(self, val_images, val_indices: np.ndarray, log: Log) -> None:
        self._carry()
        if self.at.count == 0:
            raise PctuneError("the training data yielded no images")
        seconds = time.perf_counter() - self.started
        per_pcoder = [t / self.at.count for t in self.at.totals]
        record = {"epoch": self.at.epoch, "loss": sum(per_pcoder), "pcoder_losses": per_pcoder,
                  "images": self.at.count, "steps": self.at.step, "seconds": seconds,
                  "images_per_s": (self.at.count - self.seen_before) / max(seconds, 1e-9)}
        if len(val_indices):
            val = self._validate(val_images, val_indices)
            record.update(val_loss=sum(val), val_pcoder_losses=val)
            if self.best is None or record["val_loss"] < self.best["val_loss"]:
                self.best = {"epoch": record["epoch"], "val_loss": record["val_loss"],
                             "decoders": copy.deepcopy(self.net.decoders.state_dict())}
        self.history.append(record)
        self.at = Position(epoch=self.at.epoch + 1, totals=[0.0] * self.net.num_pcoders)
        log(summary(record, self.plan.epochs))
        self.save(self.checkpoint(), {"epoch": record["epoch"], "step": record["steps"], "record": record,
                                      **self._take_steps()})

    def stopped_early(self) -> bool:
        patience, best = self.plan.patience, self.best
        return bool(patience and best and self.history and self.history[-1]["epoch"] - best["epoch"] >= patience)

    @torch.no_grad()
    def _validate(self, val_images, indices: np.ndarray) -> list[float]:
        totals = torch.zeros(self.net.num_pcoders, dtype=torch.float64)
        mine = share(indices, self.rank, self.world)
        size = max(1, self.plan.batch_size // self.world)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_images, mine.tolist()), batch_size=size)
        for batch in loader:
            images = (batch[0] if isinstance(batch, list | tuple) else batch).to(self.device)
            with self.autocast:
                totals += reconstruction_losses(self.net, images, self.model.module if self.world > 1 else self.model
                                                ).double().cpu() * len(images)
        totals = self._sum(totals)
        return (totals / len(indices)).tolist()

    # -- sums across ranks ------------------------------------------------------------------------------
    def _carry(self) -> None:
        """Add every rank's losses since the last carry to the (global) position."""
        sums = self._sum(torch.cat([self.local, torch.tensor([float(self.local_count)], dtype=torch.float64)]))
        self.at.totals = [a + float(b) for a, b in zip(self.at.totals, sums[:-1], strict=True)]
        self.at.count += int(sums[-1])
        self.local.zero_()
        self.local_count = 0

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def _take_steps(self) -> dict[str, Any]:
        """The steps since the last report with their global batch's loss (each rank's share of it, summed:
        one collective per report, not per step)."""
        steps, self.step_losses = self.step_losses, []
        losses = self._sum(torch.tensor([loss for _, loss in steps], dtype=torch.float64)).tolist()
        return {"step_losses": [(step, loss) for (step, _), loss in zip(steps, losses, strict=True)],
                "started_at": self.started_at}

    # -- checkpoints ----------------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        at = self.at
        return feedback_payload(self.net, optimizer=self.optimizer.state_dict(), history=list(self.history),
                                position={"epoch": at.epoch, "step": at.step, "totals": at.totals, "count": at.count},
                                best=self.best, plan=self.plan.record())

    def restore(self, state: dict | None, log: Log) -> None:
        if not state:
            return
        changed = self.plan.differences(state.get("plan") or {}) if state.get("plan") else []
        if changed:
            raise PctuneError(f"the checkpoint was trained with another plan ({'; '.join(changed)}): resume with "
                              "the same settings, or start over in another --out")
        self.net.decoders.load_state_dict(state["decoders"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = list(state["history"])
        self.best = state.get("best")
        position = state.get("position") or {"epoch": len(self.history) + 1}  # an epoch-end checkpoint
        self.at = Position(epoch=int(position["epoch"]), step=int(position.get("step", 0)),
                           totals=list(position.get("totals") or [0.0] * self.net.num_pcoders),
                           count=int(position.get("count", 0)))


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    if device.type != "cuda":
        raise PctuneError(f"--precision {precision} needs a GPU (--device cuda); on {device.type} train in fp32")
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def summary(record: dict, epochs: int) -> str:
    """The epoch's line: losses per pcoder, validation, time and speed."""
    parts = " ".join(f"pc{i}={v:.4g}" for i, v in enumerate(record["pcoder_losses"], start=1))
    line = f"epoch {record['epoch']}: loss {record['loss']:.4g} ({parts})"
    if "val_loss" in record:
        line += f", val {record['val_loss']:.4g}"
    left = (epochs - record["epoch"]) * record["seconds"]
    return line + (f" [{record['seconds']:.1f}s, {record['images_per_s']:.0f} images/s; epoch {record['epoch']} of "
                   f"{epochs}, about {left:.0f}s left]")
