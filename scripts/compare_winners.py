"""Compare two searches' promoted winners through the same promotion stages (noise sweep, ImageNet-C):
clean accuracy over t, mCE over t, accuracy under sigma = 0.5 noise over t, and the objective's gain
at sigma = 0.5, T = 4 against feedforward. Prints Markdown tables and the robust job's three checks,
writes one plot. Used for the README's "Robust objectives" section:

    pctune search demo && pctune promote demo --stages noise,imagenet-c
    pctune search demo-robust && pctune promote demo-robust
    python scripts/compare_winners.py pctune_runs/demo pctune_runs/demo-robust --plot docs/demo_robust_vs_paper.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from pctune.utils import pyplot, save_figure


def load(run_dir: Path) -> dict:
    """The rank-1 promotion tables of a run directory, and its winner's and feedforward's search scores."""
    promoted = run_dir / "promotion" / "rank1"
    noise = pd.read_csv(promoted / "noise" / "noise_sweep.csv")
    mce = pd.read_csv(promoted / "imagenet-c" / "mce.csv")
    best = pd.read_csv(run_dir / "leaderboard.csv").dropna(subset=["rank"]).sort_values("rank").iloc[0]
    feedforward = json.loads((run_dir / "references.json").read_text())["feedforward"]["metrics"]
    noisy = "mean_ce_noise" if "mean_ce_noise" in best else "mean_ce"
    return {"clean": noise[noise.sigma == 0.0].set_index("timestep").accuracy,
            "noisy": noise[noise.sigma == 0.5].set_index("timestep").accuracy,
            "mce": mce.set_index("timestep").mce,
            "objective": float(best[noisy]), "feedforward": float(feedforward.get(noisy, feedforward["mean_ce"]))}


def checks(robust: dict, paper: dict) -> list[str]:
    """The robust objective's three targets on the promotion results."""
    drop = robust["clean"].iloc[0] - robust["clean"].min()
    mce_rise = (robust["mce"] - robust["mce"].iloc[0]).max()
    kept = (robust["feedforward"] - robust["objective"]) / (paper["feedforward"] - paper["objective"])
    return [f"clean accuracy: worst t is {100 * drop:.1f} points below t = 0 (target <= 0.5): "
            f"{'met' if drop <= 0.005 + 1e-9 else 'NOT met'}",
            f"mCE: worst t is {mce_rise:+.4f} against t = 0 (target <= 0): {'met' if mce_rise <= 1e-9 else 'NOT met'}",
            f"gain in mean CE at sigma = 0.5, T = 4 kept: {100 * kept:.0f}% of the paper-style winner's "
            f"(target >= 80%): {'met' if kept >= 0.8 else 'NOT met'}"]


def table(runs: dict[str, dict], key: str, fmt: str) -> str:
    frame = pd.DataFrame({label: run[key] for label, run in runs.items()}).T
    head = "| | " + " | ".join(f"t={t}" for t in frame.columns) + " |"
    rule = "|---" * (len(frame.columns) + 1) + "|"
    rows = [f"| {label} | " + " | ".join(format(v, fmt) for v in row) + " |" for label, row in frame.iterrows()]
    return "\n".join([head, rule, *rows])


def plot(runs: dict[str, dict], path: Path) -> Path:
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("clean", "noisy", "mce"),
                              ("clean accuracy", "accuracy, sigma = 0.5", "ImageNet-C mCE (lower is better)"),
                              strict=True):
        for label, run in runs.items():
            ax.plot(run[key].index, run[key].values, marker="o", label=label)
        ax.set(xlabel="timestep", title=title)
    axes[0].legend()
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paper", type=Path, help="run directory of the paper-style search (e.g. pctune_runs/demo)")
    parser.add_argument("robust", type=Path, help="run directory of the robust search")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    runs = {"paper-style winner": load(args.paper), "robust winner": load(args.robust)}
    paper, robust = runs.values()
    print(f"mean CE at sigma = 0.5, T = 4: feedforward {paper['feedforward']:.4f}, paper-style "
          f"{paper['objective']:.4f}, robust {robust['objective']:.4f}\n")
    for key, title, fmt in (("clean", "clean accuracy", ".3f"), ("noisy", "accuracy at sigma = 0.5", ".3f"),
                            ("mce", "ImageNet-C mCE", ".4f")):
        print(f"{title}:\n{table(runs, key, fmt)}\n")
    print("\n".join(checks(robust, paper)))
    if args.plot:
        print(f"plot: {plot(runs, args.plot)}")


if __name__ == "__main__":
    main()
