"""The ``explain`` stage: Grad-CAM over timesteps (Choksi et al., ESANN 2025) on many images and noise
levels: does the evidence move toward the object?

For every image, noise level and timestep t = 0..T, the IoU of the thresholded Grad-CAM map of the
network unrolled to t against the object mask, by the rule of :mod:`pctune.measure.gradcam` (shared with
the ``cam_iou`` search objective). Gaussian noise is added in normalized space, as in the noise stage,
one seeded draw per image shared by every sigma and timestep.

Work is split into shards (sigma x chunk of images) that run as Ray tasks and are checkpointed one
file each (:mod:`pctune.evaluate.shards`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pctune.evaluate.shards import run_shards
from pctune.measure.gradcam import (  # noqa: F401 (re-exported: moved to pctune.measure.gradcam)
    ExplainPayload,
    layer_cams,
    timestep_ious,
)
from pctune.utils import Log, print_line


@dataclass(frozen=True)
class Shard:
    sigma: float
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"sigma{self.sigma:g}_{self.start:05d}-{self.stop:05d}"


def plan_shards(sigmas: Sequence[float], num_images: int, chunk: int) -> list[Shard]:
    return [Shard(float(s), a, min(a + chunk, num_images)) for s in sigmas for a in range(0, num_images, chunk)]


def noisy(payload: ExplainPayload, start: int, stop: int, sigma: float) -> Tensor:
    """Pixels of images start..stop with Gaussian noise of ``sigma`` in normalized space (no clipping,
    as the noise stage): one seeded draw per image, the same for every sigma."""
    x = payload.pixels[start:stop]
    if sigma == 0:
        return x
    std = torch.as_tensor(payload.std, dtype=x.dtype).flatten()
    std = (std if std.numel() > 1 else std.repeat(x.shape[1])).view(1, -1, 1, 1)
    z = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(payload.seed * 1_000_003 + i))
                     for i in range(start, stop)])
    return x + sigma * std * z


def run_shard(payload: ExplainPayload, shard: Shard) -> dict[str, Any]:
    """IoU per image at every timestep for one chunk at one noise level, and the seconds it took."""
    x = noisy(payload, shard.start, shard.stop, shard.sigma)
    labels = payload.labels[shard.start:shard.stop]
    objects, valid = payload.objects[shard.start:shard.stop], payload.valid[shard.start:shard.stop]
    began = time.perf_counter()
    ious = {str(t): v.tolist() for t, v in timestep_ious(payload, x, labels, objects, valid,
                                                           range(payload.timesteps + 1)).items()}
    return {"sigma": shard.sigma, "start": shard.start, "stop": shard.stop, "iou": ious,
            "seconds": time.perf_counter() - began}


def run_all(payload: ExplainPayload, sigmas: Sequence[float], out_dir: Path, chunk: int = 50, use_ray: bool = True,
            log: Log = print_line) -> list[dict]:
    """Run every shard not yet in ``out_dir/shards`` (on Ray, or in this process) and return all results."""
    shards = plan_shards(sigmas, len(payload.labels), chunk)
    return run_shards(run_shard, payload, shards, out_dir, use_ray=use_ray, log=log, what="explain")


def iou_matrix(results: list[dict], sigma: float) -> np.ndarray:
    """IoU ``[T+1, images]`` at one noise level, images in their order."""
    chunks = sorted((r for r in results if r["sigma"] == sigma), key=lambda r: r["start"])
    steps = sorted(int(t) for t in chunks[0]["iou"])
    return np.array([[v for r in chunks for v in r["iou"][str(t)]] for t in steps], dtype=float)


def iou_table(results: list[dict], resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean IoU per (sigma, timestep), relative to t = 0, with paired bootstrap 95% intervals: one set
    of resampled image indices per replicate, applied to every timestep and every noise level, so
    that IoU(t) - IoU(0) and IoU(t) / IoU(0) are compared on the same images."""
    sigmas = sorted({float(r["sigma"]) for r in results})
    matrices = {s: iou_matrix(results, s) for s in sigmas}
    n = next(iter(matrices.values())).shape[1]
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    rows = []
    for sigma, m in matrices.items():
        boot = m[:, idx].mean(axis=2)  # [T+1, resamples]
        diff = boot - boot[0:1]
        mean = m.mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel_boot = boot / boot[0:1]
        for t in range(m.shape[0]):
            rel = rel_boot[t][np.isfinite(rel_boot[t])]
            rows.append({"sigma": sigma, "timestep": t, "iou": mean[t], "ci_low": np.percentile(boot[t], 2.5),
                         "ci_high": np.percentile(boot[t], 97.5), "bootstrap_std": boot[t].std(ddof=1) if
                         resamples > 1 else 0.0, "delta_t0": mean[t] - mean[0],
                         "delta_ci_low": np.percentile(diff[t], 2.5), "delta_ci_high": np.percentile(diff[t], 97.5),
                         "relative_t0": mean[t] / mean[0] if mean[0] > 0 else np.nan,
                         "rel_ci_low": np.percentile(rel, 2.5) if rel.size else np.nan,
                         "rel_ci_high": np.percentile(rel, 97.5) if rel.size else np.nan, "images": n})
    return pd.DataFrame(rows)


def cost_per_image_timestep(results: list[dict]) -> float:
    """Measured seconds of Grad-CAM per image per timestep, over all shards."""
    images = sum((r["stop"] - r["start"]) * len(r["iou"]) for r in results)
    return sum(r["seconds"] for r in results) / max(1, images)
