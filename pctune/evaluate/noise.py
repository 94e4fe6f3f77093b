"""The paper's Gaussian-noise sweep and denoising analyses (Fig. 2a-d).

For every sigma, Gaussian noise (drawn from a seed) is added to the normalized clean images, and at
every timestep we report accuracy, the reconstruction error of the first decoder against the *clean*
image, and, per pcoder, the correlation distance between the representations of the clean and the
noisy image, divided by its value at timestep 0 (below 1: the dynamics pull the noisy representation
towards the clean one).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet
from pctune.utils import pyplot, save_figure

#: A clean-vs-clean distance (sigma = 0) is zero up to rounding (1e-16): no ratio to timestep 0 then.
_NO_DISTANCE = 1e-9


def correlation_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - Pearson correlation per image of two batches of representations."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return 1.0 - corr


@torch.no_grad()
def noise_sweep(net: PredictiveNet, hparams: Hyperparameters, images: Tensor, labels: Tensor, timesteps: int,
                sigmas: list[float], seed: int = 0, batch_size: int = 100) -> pd.DataFrame:
    """One row per (sigma, timestep): accuracy, reconstruction MSE to the clean image, and per pcoder
    the mean correlation distance clean vs noisy, normalized to timestep 0."""
    device = next(net.parameters()).device
    rows = []
    for sigma in sigmas:
        gen = torch.Generator().manual_seed(seed)
        correct = torch.zeros(timesteps + 1, dtype=torch.float64)
        recon = torch.zeros(timesteps + 1, dtype=torch.float64)
        dist = torch.zeros(timesteps + 1, net.num_pcoders, dtype=torch.float64)
        for i in range(0, len(images), batch_size):
            clean = images[i:i + batch_size]
            noisy = clean + sigma * torch.randn(clean.shape, generator=gen)
            clean, noisy, y = clean.to(device), noisy.to(device), labels[i:i + batch_size].to(device)
            a = net.run(clean, timesteps, hparams, return_representations=True)
            b = net.run(noisy, timesteps, hparams, return_representations=True)
            correct += (b.logits.argmax(-1) == y).sum(1).double().cpu()
            recon += (b.reconstructions - clean).square().flatten(2).mean(2).sum(1).double().cpu()
            for t in range(timesteps + 1):
                for n in range(net.num_pcoders):
                    dist[t, n] += correlation_distance(a.representations[t][n], b.representations[t][n]).sum().cpu()
        count = len(images)
        dist = dist / count
        for t in range(timesteps + 1):
            row = {"sigma": sigma, "timestep": t, "accuracy": (correct[t] / count).item(),
                   "recon_mse_to_clean": (recon[t] / count).item()}
            for n in range(net.num_pcoders):
                base = dist[0, n].item()
                row[f"corr_dist_pc{n + 1}"] = dist[t, n].item()
                row[f"corr_dist_pc{n + 1}_rel_t0"] = dist[t, n].item() / base if base > _NO_DISTANCE else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def plot_accuracy_per_sigma(table: pd.DataFrame, path) -> object:
    """Accuracy over timesteps, one line per noise level (the paper's Fig. 2a)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for sigma, group in table.groupby("sigma"):
        ax.plot(group.timestep, group.accuracy, marker="o", label=f"sigma={sigma:g}")
    ax.set(xlabel="timestep", ylabel="accuracy", title="Accuracy over timesteps per noise level")
    ax.legend()
    return save_figure(fig, path)
