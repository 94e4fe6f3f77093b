"""A robust objective's trade-off on the parent run: every configuration's mean CE under two of its
conditions (e.g. noisy against clean), the Pareto front highlighted, infeasible configurations
marked, the reference points (feedforward, the model's presets) labelled; as a table and a plot."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pctune.tracking.runs import SearchTracker
from pctune.utils import pyplot, save_figure


def write_tradeoff(points: pd.DataFrame, axes: tuple[str, str], out: Path) -> list[Path]:
    """``tradeoff.csv`` (the points, the front first) and ``tradeoff.png`` in ``out``. ``points``: one row
    per configuration with the columns ``kind``, ``name``, ``x`` and ``y`` (its scores on ``axes``),
    ``feasible`` and ``front``."""
    out.mkdir(parents=True, exist_ok=True)
    table = points.sort_values(["front", "x"], ascending=[False, True]).rename(columns={"x": axes[0], "y": axes[1]})
    csv = out / "tradeoff.csv"
    table.to_csv(csv, index=False)
    fig, ax = pyplot().subplots(figsize=(6, 4.5))
    trials = points[points.kind != "reference"]
    for feasible, marker, label in ((True, "o", "trial"), (False, "x", "trial breaking a constraint")):
        chosen = trials[(trials.feasible == feasible) & ~trials.front]
        if not chosen.empty:
            ax.scatter(chosen.x, chosen.y, s=14, marker=marker, color="tab:blue", alpha=0.5, label=label)
    front = trials[trials.front].sort_values("x")
    if not front.empty:
        ax.plot(front.x, front.y, marker="o", color="tab:red", label="Pareto front")
    for _, ref in points[points.kind == "reference"].iterrows():
        ax.scatter([ref.x], [ref.y], marker="*", s=120, color="black")
        ax.annotate(ref["name"], (ref.x, ref.y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    hidden = _zoom(ax, points)
    ax.set(xlabel=f"{axes[0]} (lower is better)", ylabel=f"{axes[1]} (lower is better)",
           title="Trade-off between conditions" + (f" ({hidden} far-off trials not shown)" if hidden else ""))
    ax.legend(fontsize=8)
    return [csv, save_figure(fig, out / "tradeoff.png")]


def log_tradeoff(tracker: SearchTracker, points: pd.DataFrame, axes: tuple[str, str], out: Path,
                 champion: dict[str, str]) -> list[Path]:
    """Log the trade-off table and plot on the parent run, with the champion's rule and constraint
    status as tags (``champion``: ``{"rule": ..., "feasible": ...}``)."""
    paths = write_tradeoff(points, axes, out)
    for path in paths:
        tracker.client.log_artifact(tracker.parent_id, str(path))
    for key, value in champion.items():
        tracker.client.set_tag(tracker.parent_id, f"pctune.champion_{key}", value)
    return paths


def _zoom(ax, points: pd.DataFrame) -> int:
    """Limit the axes to the region that matters (the front, the references and the better 80% of the
    trials), so that a few failed configurations do not squash the rest; returns how many are cut off."""
    keep = points[(points.kind == "reference") | points.front]
    limits = {}
    for axis in ("x", "y"):
        high = max(points[axis].quantile(0.8), keep[axis].max() if not keep.empty else -float("inf"))
        low = points[axis].min()
        pad = 0.05 * (high - low or abs(high) or 1.0)
        limits[axis] = (low - pad, high + pad)
    ax.set_xlim(*limits["x"])
    ax.set_ylim(*limits["y"])
    outside = (points.x > limits["x"][1]) | (points.y > limits["y"][1])
    return int(outside.sum())
