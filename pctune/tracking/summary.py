"""The search summary on the parent run: best/baseline/default scores, the leaderboard CSV, and
plots (score over trials, accuracy per timestep, Optuna's hyperparameter importances)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from pctune.tracking.runs import SearchTracker

_ACC = re.compile(r"^accuracy_t(\d+)$")
_PARAM = re.compile(r"^pcoder\d+\.(beta|lambda|alpha)$")


def accuracy_curve(result: Mapping) -> list[float]:
    steps = sorted((int(m.group(1)), float(v)) for k, v in result.items() if (m := _ACC.match(str(k))))
    return [v for _, v in steps]


def param_importances(trials: pd.DataFrame, score: str = "mean_ce") -> dict[str, float]:
    """Optuna's (fANOVA) importances of the varying ``pcoder{n}.*`` parameters for ``score``."""
    import optuna

    finite = trials[pd.to_numeric(trials[score], errors="coerce").notna()]
    params = [c for c in finite.columns if _PARAM.match(str(c)) and finite[c].nunique() > 1]
    if len(finite) < 3 or not params:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    dists = {p: optuna.distributions.FloatDistribution(float(finite[p].min()), float(finite[p].max()))
             for p in params}
    for _, row in finite.iterrows():
        study.add_trial(optuna.trial.create_trial(params={p: float(row[p]) for p in params}, distributions=dists,
                                                  value=float(row[score])))
    return dict(optuna.importance.get_param_importances(study))


def write_plots(trials: pd.DataFrame, references: Mapping[str, Mapping], out: Path,
                score: str = "mean_ce") -> list[Path]:
    """PNG files in ``out``: score over trials, accuracy per timestep of the best trial vs the
    references (e.g. baseline, default), and hyperparameter importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    ordered = trials.reset_index(drop=True)
    values = pd.to_numeric(ordered[score], errors="coerce")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(range(len(values)), values, s=12, label="trial")
    ax.plot(range(len(values)), values.cummin(), color="black", label="best so far")
    for name, result in references.items():
        if score in result:
            ax.axhline(float(result[score]), linestyle="--", label=name, color=_color(name))
    ax.set(xlabel="trial", ylabel=f"{score} (lower is better)", title="Score over trials")
    ax.legend()
    paths.append(_save(fig, out / "score_over_trials.png"))

    best = ordered.loc[values.idxmin()].to_dict() if values.notna().any() else {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in {"best": best, **references}.items():
        curve = accuracy_curve(result)
        if curve:
            ax.plot(range(len(curve)), curve, marker="o", label=name, color=_color(name))
    ax.set(xlabel="timestep", ylabel="accuracy", title="Accuracy per timestep")
    ax.legend()
    paths.append(_save(fig, out / "accuracy_per_timestep.png"))

    importances = param_importances(ordered, score)
    if importances:
        fig, ax = plt.subplots(figsize=(6, max(2.5, 0.3 * len(importances))))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (fANOVA)", title="Hyperparameter importances")
        paths.append(_save(fig, out / "param_importances.png"))
    return paths


def _color(name: str) -> str | None:
    return {"best": "tab:green", "baseline": "tab:gray", "default": "tab:orange"}.get(name)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def log_search_summary(tracker: SearchTracker, trials: pd.DataFrame, references: Mapping[str, Mapping],
                       out: Path, score: str = "mean_ce") -> dict[str, float]:
    """Log best/baseline/default scores, the best params, the leaderboard CSV and the plots."""
    values = pd.to_numeric(trials[score], errors="coerce")
    best = trials.loc[values.idxmin()]
    metrics = {f"best_{score}": float(best[score])}
    for name, result in references.items():
        if score in result:
            metrics[f"{name}_{score}"] = float(result[score])
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "leaderboard.csv"
    trials.sort_values(score).to_csv(csv, index=False)
    params = {k: v for k, v in best.items() if _PARAM.match(str(k))}
    tracker.log_summary(metrics, params=params, artifacts=[csv, *write_plots(trials, references, out, score)])
    return metrics
