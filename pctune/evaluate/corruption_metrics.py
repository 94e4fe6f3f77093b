"""ImageNet-C metrics (``shared/spec/evaluation.md``, "ImageNet-C"): from per-image correctness at
every timestep, the top-1 errors, CE and relative CE (AlexNet-normalized), mCE and relative mCE over
the 15 standard corruptions, the 4 extra ones apart, and paired bootstrap intervals; and their plots.
The corruptions and AlexNet's reference errors are :mod:`pctune.measure.corruptions`'.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pctune.measure.corruptions import (  # noqa: F401 (re-exported: moved to pctune.measure.corruptions)
    alexnet,
    extra_corruptions,
    standard_corruptions,
)
from pctune.utils import pyplot, save_figure


# -- metrics --------------------------------------------------------------------------------------
def error_table(results: list[dict]) -> pd.DataFrame:
    """Top-1 error E(c, s, t) per shard and timestep."""
    rows = []
    for r in results:
        matrix = np.asarray(r["correct"], dtype=float)
        for t, acc in enumerate(matrix.mean(axis=1) if matrix.shape[1] else [math.nan] * len(matrix)):
            rows.append({"corruption": r["corruption"], "severity": r["severity"], "timestep": t,
                         "error": 1.0 - acc, "images": r["images"], "skipped": len(r["skipped"])})
    return pd.DataFrame(rows)


def ce_table(errors: pd.DataFrame) -> pd.DataFrame:
    """Per corruption and timestep: CE (AlexNet-normalized), relative CE (needs the clean shard),
    and CE relative to the network's own timestep 0. A corruption missing a severity gets NaN."""
    ref = alexnet()
    clean = errors[errors.corruption == "clean"].set_index("timestep")["error"]
    rows = []
    for (c, t), group in errors[errors.corruption != "clean"].groupby(["corruption", "timestep"]):
        alex = ref["errors"][c]
        complete = sorted(group.severity) == [1, 2, 3, 4, 5]
        e = group.set_index("severity")["error"]
        ce = e.sum() / sum(alex) if complete else math.nan
        rel = ((e - clean.get(t, math.nan)).sum() / sum(a - ref["clean"] for a in alex)
               if complete and t in clean.index else math.nan)
        rows.append({"corruption": c, "timestep": t, "ce": ce, "relative_ce": rel,
                     "kind": "standard" if c in ref["standard"] else "extra"})
    table = pd.DataFrame(rows)
    if not table.empty:
        t0 = table[table.timestep == 0].set_index("corruption")["ce"]
        table["ce_over_t0"] = table.ce / table.corruption.map(t0)
    return table


def mce_table(ces: pd.DataFrame) -> pd.DataFrame:
    """mCE and relative mCE per timestep over the 15 standard corruptions (NaN unless all 15 have a
    CE), and the mean CE of the 4 extra ones, reported separately."""
    rows = []
    standard = set(standard_corruptions())
    for t, group in ces.groupby("timestep"):
        std = group[group.corruption.isin(standard)]
        full = len(std) == len(standard) and std.ce.notna().all()
        extra = group[group.kind == "extra"]
        rows.append({"timestep": t, "mce": std.ce.mean() if full else math.nan,
                     "relative_mce": std.relative_ce.mean() if full else math.nan,
                     "mce_extra": extra.ce.mean() if len(extra) == 4 and extra.ce.notna().all() else math.nan,
                     "standard_corruptions": int(std.ce.notna().sum())})
    return pd.DataFrame(rows)


def bootstrap_mce(results: list[dict], resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """95% intervals of mCE(t) and relative mCE(t), resampling the images of every shard with the same
    draw for every timestep (paired). Each image's correctness over timesteps is a pattern of T+1
    bits; drawing n images with replacement is a multinomial draw over the observed patterns."""
    rng = np.random.default_rng(seed)
    draws = {}
    for r in results:
        matrix = np.asarray(r["correct"], dtype=np.uint8)
        patterns, counts = np.unique(matrix.T, axis=0, return_counts=True)
        resampled = rng.multinomial(matrix.shape[1], counts / counts.sum(), size=resamples)  # [B, P]
        draws[r["corruption"], r["severity"]] = 1.0 - resampled @ patterns / matrix.shape[1]  # [B, T+1]
    ref = alexnet()
    stacks = {"mce": [], "relative_mce": []}
    for c in ref["standard"]:
        if not all((c, s) in draws for s in range(1, 6)):
            return pd.DataFrame()
        err = sum(draws[c, s] for s in range(1, 6))  # [B, T+1]
        stacks["mce"].append(err / sum(ref["errors"][c]))
        if ("clean", 0) in draws:
            denominator = sum(a - ref["clean"] for a in ref["errors"][c])
            stacks["relative_mce"].append((err - 5 * draws["clean", 0]) / denominator)
    out = {}
    for key, values in stacks.items():
        if values:
            mean = np.mean(values, axis=0)  # [B, T+1]
            out[f"{key}_ci_low"] = np.percentile(mean, 2.5, axis=0)
            out[f"{key}_ci_high"] = np.percentile(mean, 97.5, axis=0)
    frame = pd.DataFrame(out)
    frame.insert(0, "timestep", range(len(frame)))
    return frame


def summarize(results: list[dict], resamples: int = 1000, seed: int = 0) -> dict[str, pd.DataFrame]:
    errors = error_table(results)
    ces = ce_table(errors)
    mce = mce_table(ces) if not ces.empty else pd.DataFrame()
    intervals = bootstrap_mce(results, resamples, seed)
    if not mce.empty and not intervals.empty:
        mce = mce.merge(intervals, on="timestep")
    return {"errors": errors, "ce": ces, "mce": mce}


def plot_ce_last_vs_first(ces: pd.DataFrame, path: Path) -> Path:
    """CE per corruption at the last timestep relative to timestep 0 (the paper's Fig. S2/S3)."""
    plt = pyplot()
    last = ces[ces.timestep == ces.timestep.max()].sort_values("corruption")
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(last.corruption, last.ce_over_t0, color=["tab:blue" if k == "standard" else "tab:gray" for k in last.kind])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set(ylabel=f"CE(t={int(last.timestep.max())}) / CE(t=0)", title="CE per corruption, last vs first timestep")
    ax.tick_params(axis="x", rotation=70)
    return save_figure(fig, path)


def plot_mce(mce: pd.DataFrame, path: Path) -> Path:
    """mCE over timesteps with its bootstrap interval (the paper's Fig. 3b)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(mce.timestep, mce.mce, marker="o", label="mCE")
    if "mce_ci_low" in mce:
        ax.fill_between(mce.timestep, mce.mce_ci_low, mce.mce_ci_high, alpha=0.3, label="95% bootstrap")
    ax.set(xlabel="timestep", ylabel="mCE (AlexNet = 1)", title="mCE over timesteps")
    ax.legend()
    return save_figure(fig, path)
