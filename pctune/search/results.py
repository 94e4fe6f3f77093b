"""Results of a search as a person reads them: the leaderboard (with reference rows), the summary,
``leaderboard.csv`` and ``best.toml``. The ranking itself is :meth:`RunDir.ranking`.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from pctune.errors import PctuneError
from pctune.metrics import METRIC, MODE, at_timestep, is_condition_score
from pctune.pc.hyperparameters import Hyperparameters
from pctune.search.job import Job
from pctune.search.rundir import BEST, LEADERBOARD, Entry, RunDir, front_members, load_trials, rank
from pctune.search.strategies import strategy
from pctune.utils import Log, print_line

__all__ = ["best_toml", "leaderboard", "load_trials", "row_hparams", "summary_table", "write_results"]


def _row(entry: Entry, timesteps: int, columns: tuple[str, ...] = ()) -> dict[str, Any]:
    metrics = entry.metrics
    own = {k: float(metrics[k]) for k in columns if k in metrics}  # the objective's columns, first
    row = {"kind": entry.kind, "name": entry.name, **own, METRIC: metrics.get(METRIC, math.nan),
           "acc_t0": metrics.get(at_timestep("accuracy", 0), math.nan),
           f"acc_t{timesteps}": metrics.get(at_timestep("accuracy", timesteps), math.nan),
           "ce_t0": metrics.get(at_timestep("ce", 0), math.nan), "diverged": entry.diverged,
           "num_images": int(metrics.get("num_images", 0)), "stopped_early": not entry.full_fidelity}
    # a robust objective: each condition's mean CE, and whether the constraints hold
    row.update({k: float(v) for k, v in metrics.items() if is_condition_score(k)})
    if "feasible" in metrics:
        row["feasible"] = bool(metrics["feasible"])
    row.update(entry.params)
    if entry.trial_id is not None:
        row["trial_id"] = entry.trial_id
    return row


def leaderboard(job: Job) -> pd.DataFrame:
    """All finished trials and the reference rows (feedforward, the model's presets, the per-pcoder
    combination), lowest score first, then the trials stopped early (their running score over the
    images they saw); ``rank`` is the position in :meth:`RunDir.ranking` (blank for references,
    diverged points and trials stopped early, which never win)."""
    run_dir = RunDir(job.run_dir)
    run_dir.require_search(job.name)
    columns = run_dir.job(job).kinds.objective.columns()
    return _leaderboard(run_dir.entries(), run_dir.timesteps, run_dir.front(), run_dir.goal(), columns)


def _leaderboard(entries: list[Entry], timesteps: int, front: list[str] | None = None,
                 goal: tuple[str, str] = (METRIC, MODE), columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Entries by score, best first (a Pareto search: its ranking first, the front marked), stopped ones last."""
    ranking = rank(entries, front or (), goal)
    ranked = {id(e): i for i, e in enumerate(ranking, start=1)}
    metric, sign = goal[0], (1.0 if goal[1] == "min" else -1.0)
    order = sorted(entries, key=lambda e: (not e.full_fidelity, ranked.get(id(e), math.inf) if front else 0,
                                           sign * e.score(metric) if math.isfinite(e.score(metric)) else math.inf))
    on_front = front_members(entries, front or ())
    rows = [{"rank": ranked.get(id(e)), **_row(e, timesteps, columns),
             **({"pareto_front": id(e) in on_front} if front else {})} for e in order]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    frame["rank"] = frame["rank"].astype("Int64")
    return frame


def row_hparams(row: pd.Series) -> Hyperparameters:
    """The hyperparameters of a leaderboard row."""
    return Hyperparameters.from_params(row.to_dict())  # the pcoder{n}.* columns; the others are ignored


def best_toml(job: Job, best: Entry, model: str) -> str:
    """best.toml of ``job``'s search (the job as the search ran it: :meth:`RunDir.job`)."""
    objective = job.kinds.objective
    metric, scored = objective.metric, objective.describe()
    header = [f"# Best hyperparameters of search job {job.name!r} ({best.kind} {best.name}):",
              f"# {metric} = {best.score(metric):.6g} ({scored}).",
              "# Load with Hyperparameters.from_mapping(tomllib.load(f)).",
              f'model = "{model}"', ""]
    return "\n".join(header) + best.hparams.to_toml()


def summary_table(frame: pd.DataFrame, timesteps: int, columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """best / default / feedforward side by side (the demo's final table)."""
    rows = []
    ranked = frame[frame["rank"].notna()]
    if not ranked.empty:
        rows.append(("best found", ranked.iloc[0]))
    refs = frame[frame["kind"] == "reference"]
    for name in ("default", "tuned", "feedforward"):
        match = refs[refs["name"] == name]
        if not match.empty:
            rows.append((f"{name} (reference)", match.iloc[0]))
    cols = [*(c for c in columns if c in frame), METRIC, "ce_t0", "acc_t0", f"acc_t{timesteps}"]
    return pd.DataFrame([{"configuration": label, **{c: r[c] for c in cols}} for label, r in rows])


def _another_writer(run_dir: RunDir) -> str | None:
    """Who else holds the run directory's lock (a running search), if anyone: ``pctune results`` then
    prints without writing, so that it never races the search's own writes and manifest."""
    from pctune.search.runlock import describe, other_owner

    owner = other_owner(run_dir.path)
    return None if owner is None else describe(owner)


def write_results(job: Job, log: Log = print_line, top: int | None = 20) -> dict[str, Any]:
    """Print the leaderboard and the summary, write ``leaderboard.csv`` and ``best.toml``."""
    run_dir = RunDir(job.run_dir)
    run_dir.require_search(job.name)
    record = run_dir.job_record()
    timesteps = int(record["job"]["objective"]["timesteps"])
    entries = run_dir.entries()  # read once: the leaderboard and the best come from the same entries
    front, goal = run_dir.front(), run_dir.goal()
    searched = run_dir.job(job)  # the job as the search ran it (an older run directory: the job given)
    columns = searched.kinds.objective.columns()
    frame = _leaderboard(entries, timesteps, front, goal, columns)
    if frame.empty:
        raise PctuneError(f"{run_dir.path}: no finished trials yet")
    busy = _another_writer(run_dir)
    if busy is None:
        run_dir.write_text(LEADERBOARD, frame.to_csv(index=False))  # atomic: a full disk leaves the earlier one
    trials = int((frame["kind"] == "trial").sum())
    with pd.option_context("display.width", 200, "display.max_columns", 12, "display.float_format", "{:.4f}".format):
        shown = frame if top is None else frame.head(top)
        stopped = int(frame["stopped_early"].sum())
        log(f"leaderboard of {job.name} ({trials} trials{f', {stopped} stopped early' if stopped else ''}; "
            f"top {len(shown)}):")
        log(shown.drop(columns=["trial_id"], errors="ignore").to_string(index=False))
        summary = summary_table(frame, timesteps, columns)
        objective = record["job"]["objective"]
        condition = (f"condition {objective['conditions'][0]['name']!r}" if objective.get("conditions")
                     else f"noisy images, sigma = {objective['sigma']}")
        log(f"\nsummary ({condition}, T = {timesteps}):")
        log(summary.to_string(index=False))
    out = {"run_dir": str(run_dir.path), "leaderboard": str(run_dir / LEADERBOARD), "trials": trials,
           "summary": summary.to_dict("records")}
    best = next(iter(rank(entries, front, goal)), None)
    if best is None:
        log("\nno configuration to recommend: every finished trial diverged, was stopped early or broke a "
            "constraint")
    else:
        if busy is None:
            run_dir.write_text(BEST, best_toml(searched, best, record["model"]))
        log("\nbest configuration:")
        for n, (b, lam, a) in enumerate(best.hparams.triples(), start=1):
            log(f"  pcoder{n}: beta={b:.4f} lambda={lam:.4f} alpha={a:.4g}")
        log(f"written: {run_dir / LEADERBOARD}, {run_dir / BEST}" if busy is None else
            f"not written (the run directory is in use by {busy}: it writes them when it ends)")
        out.update(best=best.score(goal[0]), best_toml=str(run_dir / BEST), best_hparams=best.hparams.to_mapping(),
                   best_key=best.key)
    refs = frame[frame["kind"] == "reference"].set_index("name")[goal[0]].to_dict()
    out["references"] = {k: float(v) for k, v in refs.items()}
    if strategy(record.get("strategy")).exhaustive and busy is None:  # a sweep: its table and heatmaps
        from pctune.search.sweep import write_sweep

        out["sweep"] = [str(p) for p in write_sweep(run_dir, searched.kinds.objective, log)]
    return out
