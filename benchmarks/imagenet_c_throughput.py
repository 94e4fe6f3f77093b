"""ImageNet-C evaluation throughput: images per second per timestep of PVGG16 and PEfficientNetB0
(random weights, 224x224) through ``pctune.evaluate.imagenet_c.evaluate_shard``, and whether JPEG
decoding keeps up (the same shard's images decoded and normalized alone).

    python benchmarks/imagenet_c_throughput.py [--images 16] [--timesteps 4] [--device cpu|cuda]

Writes benchmarks/results/imagenet_c_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import pctune
from pctune.evaluate import imagenet_c as ic


def make_tree(root: Path, images: int) -> None:
    """A released-layout shard (fog/1) of random 224x224 JPEGs in 4 classes, plus 996 empty classes so
    the class list matches a 1000-way model."""
    rng = np.random.default_rng(0)
    for k in range(1000):
        (root / "fog" / "1" / f"n{k:08d}").mkdir(parents=True)
    for i in range(images):
        img = rng.integers(0, 255, size=(224, 224, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "fog" / "1" / f"n{i % 4:08d}" / f"{i}.JPEG", quality=85)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="pvgg16,peffnetb0")
    args = parser.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": args.device,
                           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                           "load_avg_1m": os.getloadavg()[0]},
               "images": args.images, "timesteps": args.timesteps, "batch_size": args.batch_size, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tree(root, args.images)
        for name in args.models.split(","):
            torch.manual_seed(0)
            net = pctune.create_model(name).to(args.device)
            plan = ic.plan_released(root, ["fog"], [1], clean=None, num_classes=1000)
            payload = ic.CorruptionPayload(net, net.hyperparameters("tuned"), args.timesteps, plan, 224,
                                 (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), batch_size=args.batch_size,
                                 workers=args.workers)
            shard = plan.shards[0]
            ic.evaluate_shard(payload, shard)  # warm-up
            start = time.perf_counter()
            out = ic.evaluate_shard(payload, shard)
            seconds = time.perf_counter() - start
            loader = torch.utils.data.DataLoader(ic._ShardImages(payload, shard), batch_size=args.batch_size,
                                                 num_workers=args.workers)
            start = time.perf_counter()
            decoded = sum(len(y) for _, y, _ in loader)
            decode_s = time.perf_counter() - start
            per_s = out["images"] / seconds
            results["models"][name] = {
                "seconds": seconds, "images_per_s": per_s,
                "image_timesteps_per_s": per_s * (args.timesteps + 1),
                "decode_images_per_s": decoded / decode_s,
                "decoding_keeps_up": decoded / decode_s > per_s,
            }
            print(name, json.dumps(results["models"][name]))
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "imagenet_c_throughput.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
