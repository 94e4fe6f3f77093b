"""The single-pcoder sweep's results (strategy ``"single-pcoder-grid"``, :mod:`pctune.search.grid`):
one row per grid point and the heatmaps of the ESANN study's Fig. 3, one panel per pcoder, lambda
across, beta up, the colour the objective at the end of the dynamics relative to the feedforward
pass: IoU(T) / IoU(0) for ``objective.kind = "cam_iou"`` (the mean over t = 1..T with
``cam_timesteps = "mean"``), mean CE(1..T) / CE(0) for the cross-entropy.

Written into the run directory as ``sweep.csv`` and ``sweep.png`` by :func:`write_sweep` (from
``pctune search`` at its end, and ``pctune results``), and logged on the search's MLflow parent run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pctune.search.rundir import SWEEP_CSV, SWEEP_PNG, RunDir
from pctune.utils import Log, print_line, pyplot, save_figure


def sweep_table(run_dir: RunDir, objective) -> pd.DataFrame:
    """Every finished grid point: ``pcoder``, the swept pcoder's ``beta``, ``lambda``, ``alpha``, the
    objective, its value at t = 0, ``relative_t0`` (their ratio; NaN for a diverged point), ``mean_ce``,
    ``diverged`` and ``trial_id``."""
    metric, at_t0 = objective.metric, objective.at_t0()
    rows = []
    for stage, trial in run_dir.finished_trials():
        n = int(stage[len("pcoder"):])
        value, first = (float(trial.metrics.get(k, math.nan)) if k else math.nan for k in (metric, at_t0))
        diverged = bool(trial.metrics.get("diverged", 0))
        rows.append({"pcoder": n, **{k: float(trial.config[f"pcoder{n}.{k}"]) for k in ("beta", "lambda", "alpha")},
                     metric: value, **({at_t0: first} if at_t0 else {}),
                     "relative_t0": math.nan if diverged or not first else value / first,
                     "mean_ce": float(trial.metrics.get("mean_ce", math.nan)), "diverged": diverged,
                     "trial_id": trial.trial_id})
    return pd.DataFrame(rows).sort_values(["pcoder", "lambda", "beta"], ignore_index=True) if rows else pd.DataFrame()


def relative_grids(table: pd.DataFrame) -> dict[int, pd.DataFrame]:
    """pcoder -> its ``relative_t0`` as a beta x lambda table (NaN: skipped or diverged)."""
    return {int(n): group.pivot_table(index="beta", columns="lambda", values="relative_t0", dropna=False)
            for n, group in table.groupby("pcoder")}


def plot_sweep(table: pd.DataFrame, label: str, title: str, path: Path) -> Path:
    """One heatmap per pcoder (lambda across, beta up; the colour centred at 1 = no change from t = 0),
    each cell annotated with its value."""
    import matplotlib
    from matplotlib.colors import TwoSlopeNorm

    plt = pyplot()
    panels = relative_grids(table)
    finite = table["relative_t0"][np.isfinite(table["relative_t0"])]
    low, high = (min(finite.min(), 0.999), max(finite.max(), 1.001)) if len(finite) else (0.999, 1.001)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=low, vmax=high)
    cmap = matplotlib.colormaps["coolwarm"].with_extremes(bad="white")  # white: skipped (beta + lambda > 1) or diverged
    widths = [max(len(g.columns), 1) for g in panels.values()]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(1.1 * sum(widths) + 2.2, 3.6), squeeze=False,
                             gridspec_kw={"width_ratios": [*widths, 0.25]})  # the last one: the colour bar
    image = None
    for ax, (n, grid) in zip(axes[0][:-1], panels.items(), strict=True):
        image = ax.imshow(grid.to_numpy(dtype=float), origin="lower", cmap=cmap, norm=norm, aspect="auto")
        failed = table[(table.pcoder == n) & table.diverged]
        diverged = set(zip(failed["beta"], failed["lambda"], strict=True))
        for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
            text = f"{v:.3f}" if np.isfinite(v) else "diverged" if (grid.index[i], grid.columns[j]) in diverged else ""
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(grid.columns)), [f"{v:g}" for v in grid.columns])
        ax.set_yticks(range(len(grid.index)), [f"{v:g}" for v in grid.index])
        ax.set(xlabel="lambda", title=f"pcoder{n}")
    axes[0][0].set_ylabel("beta")
    bar = fig.colorbar(image, cax=axes[0][-1], label=label, format="%.3f")
    bar.set_ticks(sorted({*np.linspace(low, 1.0, 4), *np.linspace(1.0, high, 4)}))  # both halves, inside the range
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def write_sweep(run_dir: RunDir, objective, log: Log = print_line) -> list[Path]:
    """``sweep.csv`` and ``sweep.png`` in the run directory (``objective``: the search's,
    ``job.kinds.objective``), and the grids printed; the paths written."""
    table = sweep_table(run_dir, objective)
    if table.empty:
        return []
    table.to_csv(run_dir.register(SWEEP_CSV), index=False)
    label = objective.relative_label()
    sigma = run_dir.job_record()["job"]["objective"]["sigma"]
    title = f"{label}, one pcoder at a time (the others feedforward); sigma = {sigma:g}, T = {run_dir.timesteps}"
    log(f"\n{label} per grid point (rows beta, columns lambda; the other pcoders feedforward):")
    for n, grid in relative_grids(table).items():
        log(f"pcoder{n}\n{grid.to_string(float_format='{:.3f}'.format, na_rep='-')}")
    paths = [run_dir / SWEEP_CSV, plot_sweep(table, label, title, run_dir.register(SWEEP_PNG))]
    log(f"written: {paths[0]}, {paths[1]}")
    return paths
