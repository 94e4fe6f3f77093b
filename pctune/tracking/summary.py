"""The search summary on the parent run: best/baseline/default scores, the leaderboard CSV, and
plots (score over trials, accuracy per timestep, Optuna's hyperparameter importances)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from pctune.metrics import step_metric
from pctune.pc.hyperparameters import PARAM_PATTERN
from pctune.tracking.runs import SearchTracker
from pctune.utils import pyplot, save_figure


def accuracy_curve(result: Mapping) -> list[float]:
    """The accuracies ``accuracy_t0``, ``accuracy_t1``, ... of a result, in timestep order."""
    steps = sorted((step[1], float(v)) for k, v in result.items()
                   if (step := step_metric(str(k))) and step[0] == "accuracy")
    return [v for _, v in steps]


def param_importances(trials: pd.DataFrame, score: str = "mean_ce") -> dict[str, float]:
    """Optuna's (fANOVA) importances of the varying ``pcoder{n}.*`` parameters for ``score``."""
    import optuna

    finite = trials[pd.to_numeric(trials[score], errors="coerce").notna()]
    params = [c for c in finite.columns if PARAM_PATTERN.match(str(c)) and finite[c].nunique() > 1]
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


def write_plots(trials: pd.DataFrame, references: Mapping[str, Mapping], out: Path, best: Mapping | None = None,
                score: str = "mean_ce", mode: str = "min") -> list[Path]:
    """PNG files in ``out``: score over trials, accuracy per timestep of ``best`` vs the references
    (e.g. baseline, default), and hyperparameter importances. ``mode``: "min" or "max", the score's
    better direction."""
    out.mkdir(parents=True, exist_ok=True)
    ordered = trials.reset_index(drop=True)
    paths = [_plot_scores(pd.to_numeric(ordered[score], errors="coerce"), references, score, mode,
                          out / "score_over_trials.png"),
             _plot_accuracy({"best": best or {}, **references}, out / "accuracy_per_timestep.png")]
    importances = param_importances(ordered, score)
    if importances:
        paths.append(_plot_importances(importances, out / "param_importances.png"))
    return paths


def _plot_scores(values: pd.Series, references: Mapping[str, Mapping], score: str, mode: str, path: Path) -> Path:
    fig, ax = pyplot().subplots(figsize=(6, 4))
    ax.scatter(range(len(values)), values, s=12, label="trial")
    ax.plot(range(len(values)), values.cummin() if mode == "min" else values.cummax(), color="black",
            label="best so far")
    for name, result in references.items():
        if score in result:
            ax.axhline(float(result[score]), linestyle="--", label=name, color=_color(name))
    ax.set(xlabel="trial", ylabel=f"{score} ({'lower' if mode == 'min' else 'higher'} is better)",
           title="Score over trials")
    ax.legend()
    return save_figure(fig, path)


def _plot_accuracy(results: Mapping[str, Mapping], path: Path) -> Path:
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for name, result in results.items():
        curve = accuracy_curve(result)
        if curve:
            ax.plot(range(len(curve)), curve, marker="o", label=name, color=_color(name))
    ax.set(xlabel="timestep", ylabel="accuracy", title="Accuracy per timestep")
    ax.legend()
    return save_figure(fig, path)


def _plot_importances(importances: Mapping[str, float], path: Path) -> Path:
    fig, ax = pyplot().subplots(figsize=(6, max(2.5, 0.3 * len(importances))))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance (fANOVA)", title="Hyperparameter importances")
    return save_figure(fig, path)


def _color(name: str) -> str | None:
    return {"best": "tab:green", "baseline": "tab:gray", "default": "tab:orange"}.get(name)


def log_search_summary(tracker: SearchTracker, trials: pd.DataFrame, references: Mapping[str, Mapping],
                       out: Path, best: Mapping | None, score: str = "mean_ce", mode: str = "min") -> dict[str, float]:
    """Log best/baseline/default scores, the best params, the leaderboard CSV and the plots. ``best``
    is the winning configuration's result with its ``pcoder{n}.*`` params (the caller's ranking
    decides it; None when nothing qualifies, e.g. every trial diverged); ``score`` and ``mode`` are
    the search's objective (``mean_ce`` minimized, or ``cam_iou`` maximized)."""
    metrics = {f"best_{score}": float(best[score])} if best else {}
    for name, result in references.items():
        if score in result:
            metrics[f"{name}_{score}"] = float(result[score])
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "leaderboard.csv"
    trials.sort_values(score, ascending=mode == "min").to_csv(csv, index=False)
    params = {k: v for k, v in (best or {}).items() if PARAM_PATTERN.match(str(k))}
    tracker.log_summary(metrics, params=params,
                        artifacts=[csv, *write_plots(trials, references, out, best, score, mode)])
    return metrics
