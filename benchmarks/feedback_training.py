"""Feedback-training throughput: ``pctune train-feedback`` of PVGG16 (random backbone weights: the cost
does not depend on them) on generated 64x64 images, with 1 worker (in the command's process) and 2 Ray
Train workers (DDP over gloo), the same global batch. Per configuration: images/s of the last epoch
(the first warms up), seconds per step, and, for 2 workers, the per-step DDP overhead: a 2-worker step
against a 1-worker step on half the batch with one thread (what each worker computes: Ray gives an
actor of one CPU one thread), i.e. what the gradient all-reduce and the step's synchronisation add. Writes JSON:

    python benchmarks/feedback_training.py --out benchmarks/results/feedback_training_cpu.json

On a GPU (``--device cuda --gpus-per-worker 1 --image-size 224 --precision bf16``) the same script
measures the configuration the issue names; on 2 CPU cores no speed-up is expected from 2 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361")  # ImageNet classes: PVGG16 predicts those


def _images(root: Path, count: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / WNIDS[i % len(WNIDS)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _train(data: Path, out: Path, args, batch: int, workers: int) -> dict:
    from pctune.feedback.cluster import Workers
    from pctune.feedback.plan import TrainPlan
    from pctune.feedback.run import TrainRequest, train

    plan = TrainPlan(epochs=args.epochs, batch_size=batch, val_fraction=0.0, precision=args.precision)
    result = train(TrainRequest(model="pvgg16", data=str(data), out=out, plan=plan,
                                workers=Workers(workers, args.gpus_per_worker, 0), image_size=args.image_size,
                                device=args.device), log=lambda _m: None)
    last = result["history"][-1]
    weights = torch.load(result["weights"], map_location="cpu")
    tensors = [t for t in _tensors(weights) if t.is_floating_point()]
    return {"decoder_parameters": sum(t.numel() for t in tensors),
            "workers": workers, "global_batch": batch, "steps": last["steps"], "images": last["images"],
            "seconds": round(last["seconds"], 3), "images_per_s": round(last["images_per_s"], 2),
            "seconds_per_step": round(last["seconds"] / last["steps"], 4)}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = _images(tmp / "images", args.images, args.image_size)
        one = _train(data, tmp / "one", args, args.batch_size, 1)
        half = _train(data, tmp / "half", args, args.batch_size // 2, 1)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # what each Ray Train worker computes with: Ray gives an actor of 1 CPU 1 thread
        half_one_thread = _train(data, tmp / "half-1", args, args.batch_size // 2, 1)
        torch.set_num_threads(threads)
        two = _train(data, tmp / "two", args, args.batch_size, 2)
    report = {"model": "pvgg16", "image_size": args.image_size, "device": args.device,
              "precision": args.precision, "cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "one_worker": one, "one_worker_half_batch": half,
              "one_worker_half_batch_one_thread": half_one_thread, "two_workers": two,
              "ddp_overhead_s_per_step": round(two["seconds_per_step"] - half_one_thread["seconds_per_step"], 4),
              "all_reduce_mb_per_step": round(two["decoder_parameters"] * 4 / 2**20, 1)}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
