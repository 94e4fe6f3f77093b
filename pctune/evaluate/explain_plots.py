"""The ``explain`` stage's figures: IoU over timesteps with its intervals, and the overlay grid."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from pctune.evaluate.explain import noisy
from pctune.measure.gradcam import ExplainPayload, cam_regions, layer_cams
from pctune.utils import pyplot, save_figure


def plot_iou(table: pd.DataFrame, path: Path) -> Path:
    """Mean IoU (left) and IoU relative to t = 0 (right) over timesteps, a line per noise level, with
    the paired bootstrap 95% intervals."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for sigma, group in table.groupby("sigma"):
        g = group.sort_values("timestep")
        left.errorbar(g.timestep, g.iou, yerr=[g.iou - g.ci_low, g.ci_high - g.iou], marker="o", capsize=2,
                      label=f"sigma={sigma:g}")
        right.errorbar(g.timestep, g.relative_t0, yerr=[g.relative_t0 - g.rel_ci_low, g.rel_ci_high - g.relative_t0],
                       marker="o", capsize=2, label=f"sigma={sigma:g}")
    left.set(xlabel="timestep", ylabel="mean IoU (Grad-CAM vs mask)", title="IoU per timestep")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set(xlabel="timestep", ylabel="IoU(t) / IoU(0)", title="relative to feedforward (t = 0)")
    left.legend(fontsize=8)
    return save_figure(fig, path)


def seeded_picks(count: int, total: int, seed: int) -> list[int]:
    """``count`` image indices drawn from ``seed`` (the overlay grid's images)."""
    gen = torch.Generator().manual_seed(seed + 7)
    return sorted(torch.randperm(total, generator=gen)[:min(count, total)].tolist())


def plot_overlays(payload: ExplainPayload, picks: list[int], sigma: float, path: Path) -> Path:
    """A row per picked image: the (noisy) image, its CAM at every timestep over it, and its mask."""
    plt = pyplot()
    x = torch.cat([noisy(payload, i, i + 1, sigma) for i in picks])
    labels = payload.labels[picks]
    maps = [cam_regions(layer_cams(payload, x, labels, t), x.shape[-2:], payload.cam_threshold)[0]
            for t in range(payload.timesteps + 1)]
    cols = payload.timesteps + 3
    fig, axes = plt.subplots(len(picks), cols, figsize=(1.6 * cols, 1.7 * len(picks)), squeeze=False)
    shown = x.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    cmap = "gray" if shown.shape[-1] == 1 else None
    for row, ax_row in enumerate(axes):
        image = shown[row] if shown.shape[-1] > 1 else shown[row, ..., 0]
        ax_row[0].imshow(image, cmap=cmap)
        ax_row[0].set_title(f"class {int(labels[row])}", fontsize=7)
        for t in range(payload.timesteps + 1):
            ax_row[t + 1].imshow(image, cmap=cmap)
            ax_row[t + 1].imshow(maps[t][row].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if row == 0:
                ax_row[t + 1].set_title(f"t={t}", fontsize=8)
        ax_row[-1].imshow(payload.objects[picks[row]].numpy(), cmap="gray")
        if row == 0:
            ax_row[-1].set_title("mask", fontsize=8)
        for ax in ax_row:
            ax.axis("off")
    fig.suptitle(f"Grad-CAM over timesteps, sigma={sigma:g}", fontsize=9)
    return save_figure(fig, path)
