"""Results of a search: the leaderboard (with reference rows), ``leaderboard.csv`` and ``best.toml``.

Trials are read straight from the Ray Tune experiment folders (``params.json`` and ``result.json`` of
each trial), so results can be read without Ray running and while a search is still going.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from pctune.errors import PctuneError
from pctune.pc.hyperparameters import Hyperparameters
from pctune.search.job import Job
from pctune.search.objective import METRIC
from pctune.search.space import hparams_from_config

_TRIAL_DIR = re.compile(r"^[A-Za-z0-9_]*?_[0-9a-f]{8}_(\d+)_")


def load_trials(exp_dir: str | Path) -> list[dict[str, Any]]:
    """Every trial of one Tune experiment, in creation order: ``{"trial_id", "index", "status",
    "config", "metrics"}``; status is TERMINATED (reported), ERROR or PENDING."""
    exp_dir = Path(exp_dir)
    trials = []
    if not exp_dir.is_dir():
        return trials
    for folder in exp_dir.iterdir():
        params = folder / "params.json"
        if not folder.is_dir() or not params.is_file():
            continue
        config = json.loads(params.read_text())
        metrics = _last_result(folder / "result.json")
        status = "TERMINATED" if metrics and METRIC in metrics else (
            "ERROR" if any(folder.glob("error.*")) else "PENDING")
        match = _TRIAL_DIR.search(folder.name)
        trials.append({"trial_id": (metrics or {}).get("trial_id", folder.name), "folder": folder.name,
                       "index": int(match.group(1)) if match else -1, "status": status, "config": config,
                       "metrics": metrics or {}})
    trials.sort(key=lambda t: (t["index"], t["folder"]))
    return trials


def _last_result(path: Path) -> dict | None:
    if not path.is_file():
        return None
    # the last complete line: a driver killed while appending leaves the last one cut short
    for line in reversed(path.read_text().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def best_trial(trials: list[dict]) -> dict | None:
    """The finished, non-diverged trial with the lowest score, with its ``hparams`` added."""
    done = [t for t in trials if t["status"] == "TERMINATED" and not t["metrics"].get("diverged")]
    if not done:
        return None
    best = min(done, key=lambda t: t["metrics"][METRIC])
    num = _num_pcoders(best["config"])
    return {**best, "hparams": hparams_from_config(best["config"], num)}


def _num_pcoders(config: dict) -> int:
    return len([k for k in config if re.fullmatch(r"pcoder\d+\.beta", k)])


def _stages(run_dir: Path) -> list[str]:
    return sorted((p.name for p in run_dir.iterdir() if p.is_dir() and re.fullmatch(r"joint|pcoder\d+", p.name)),
                  key=lambda s: (s != "joint", int(s[6:]) if s.startswith("pcoder") else 0))


def _row(kind: str, name: str, config: dict, metrics: dict, timesteps: int) -> dict[str, Any]:
    row = {"kind": kind, "name": name, METRIC: metrics.get(METRIC, math.nan),
           "acc_t0": metrics.get("accuracy_t0", math.nan),
           f"acc_t{timesteps}": metrics.get(f"accuracy_t{timesteps}", math.nan),
           "ce_t0": metrics.get("ce_t0", math.nan), "diverged": bool(metrics.get("diverged", 0))}
    keys = [k for k in config if re.fullmatch(r"pcoder\d+\.(beta|lambda|alpha)", k)]
    order = {"beta": 0, "lambda": 1, "alpha": 2}
    keys.sort(key=lambda k: (int(k[6:k.index(".")]), order[k.split(".")[1]]))
    row.update({k: config[k] for k in keys})
    return row


def leaderboard(job: Job) -> pd.DataFrame:
    """All finished trials and the reference rows (feedforward, the model's presets, the per-pcoder
    combination), best first; ``rank`` counts trials only."""
    run_dir = job.run_dir
    if not (run_dir / "job.json").is_file():
        raise PctuneError(f"no search of {job.name} in {run_dir} (run `pctune search {job.name}` first)")
    record = json.loads((run_dir / "job.json").read_text())
    timesteps = int(record["job"]["objective"]["timesteps"])
    rows = []
    for stage in _stages(run_dir):
        for t in load_trials(run_dir / stage):
            if t["status"] == "TERMINATED":
                rows.append({**_row("trial", f"{stage}/{t['index']}", t["config"], t["metrics"], timesteps),
                             "trial_id": t["trial_id"]})
    references = run_dir / "references.json"
    if references.is_file():
        for name, ref in json.loads(references.read_text()).items():
            rows.append(_row("reference", name, ref["config"], ref["metrics"], timesteps))
    combination = run_dir / "combination.json"
    if combination.is_file():
        ref = json.loads(combination.read_text())
        rows.append(_row("combination", "per-pcoder winners", ref["config"], ref["metrics"], timesteps))
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame = frame.sort_values(METRIC, kind="stable").reset_index(drop=True)
    is_trial = frame["kind"] == "trial"
    frame.insert(0, "rank", pd.Series(range(1, int(is_trial.sum()) + 1), index=frame.index[is_trial]))
    frame["rank"] = frame["rank"].astype("Int64")
    return frame


def best_row(frame: pd.DataFrame) -> pd.Series | None:
    """The best searched configuration (a trial or the per-pcoder combination), not a reference."""
    found = frame[(frame["kind"] != "reference") & ~frame["diverged"]]
    return None if found.empty else found.iloc[0]


def row_hparams(row: pd.Series) -> Hyperparameters:
    config = {k: row[k] for k in row.index if re.fullmatch(r"pcoder\d+\.(beta|lambda|alpha)", str(k))}
    return hparams_from_config(config, _num_pcoders(config))


def best_toml(job: Job, row: pd.Series, model: str) -> str:
    hp = row_hparams(row)
    header = [f"# Best hyperparameters of search job {job.name!r} ({row['kind']} {row['name']}):",
              f"# mean_ce = {row[METRIC]:.6g} (mean cross-entropy over t = 1..T on the noisy subset; lower is "
              "better).", "# Load with Hyperparameters.from_mapping(tomllib.load(f)).",
              f'model = "{model}"', ""]
    return "\n".join(header) + hp.to_toml()


def summary_table(frame: pd.DataFrame, timesteps: int) -> pd.DataFrame:
    """best / default / feedforward side by side (the demo's final table)."""
    rows = []
    best = best_row(frame)
    if best is not None:
        rows.append(("best found", best))
    refs = frame[frame["kind"] == "reference"]
    for name in ("default", "tuned", "feedforward"):
        match = refs[refs["name"] == name]
        if not match.empty:
            rows.append((f"{name} (reference)", match.iloc[0]))
    cols = [METRIC, "ce_t0", "acc_t0", f"acc_t{timesteps}"]
    return pd.DataFrame([{"configuration": label, **{c: r[c] for c in cols}} for label, r in rows])


def write_results(job: Job, log: Callable[[str], None] = print, top: int | None = 20) -> dict[str, Any]:
    """Print the leaderboard and the summary, write ``leaderboard.csv`` and ``best.toml``."""
    run_dir = job.run_dir
    frame = leaderboard(job)
    if frame.empty:
        raise PctuneError(f"{run_dir}: no finished trials yet")
    record = json.loads((run_dir / "job.json").read_text())
    timesteps = int(record["job"]["objective"]["timesteps"])
    frame.to_csv(run_dir / "leaderboard.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 12, "display.float_format", "{:.4f}".format):
        shown = frame if top is None else frame.head(top)
        log(f"leaderboard of {job.name} ({int((frame['kind'] == 'trial').sum())} trials; top {len(shown)}):")
        log(shown.drop(columns=["trial_id"], errors="ignore").to_string(index=False))
        summary = summary_table(frame, timesteps)
        log("\nsummary (noisy images, sigma = {}, T = {}):".format(record["job"]["objective"]["sigma"], timesteps))
        log(summary.to_string(index=False))
    best = best_row(frame)
    out = {"run_dir": str(run_dir), "leaderboard": str(run_dir / "leaderboard.csv"), "trials":
           int((frame["kind"] == "trial").sum()), "summary": summary.to_dict("records")}
    if best is not None:
        (run_dir / "best.toml").write_text(best_toml(job, best, record["model"]))
        hp = row_hparams(best)
        log("\nbest configuration:")
        for n, (b, lam, a) in enumerate(hp.triples(), start=1):
            log(f"  pcoder{n}: beta={b:.4f} lambda={lam:.4f} alpha={a:.4g}")
        log(f"written: {run_dir / 'leaderboard.csv'}, {run_dir / 'best.toml'}")
        out.update(best=float(best[METRIC]), best_toml=str(run_dir / "best.toml"), best_hparams=hp.to_mapping())
    refs = frame[frame["kind"] == "reference"].set_index("name")[METRIC].to_dict()
    out["references"] = {k: float(v) for k, v in refs.items()}
    return out


def top_k(job: Job, k: int | None = None) -> list[dict[str, Any]]:
    """The ``k`` best searched configurations (default: the job's ``promotion.top_k``), best first:
    ``{"rank", "name", "trial_id", "mean_ce", "hparams"}``; diverged trials and references excluded.
    This is what the promotion stages read."""
    k = job.promotion.top_k if k is None else k
    frame = leaderboard(job)
    if frame.empty:
        return []
    found = frame[(frame["kind"] != "reference") & ~frame["diverged"]].head(k)
    return [{"rank": i, "name": row["name"], "trial_id": row.get("trial_id") if isinstance(row.get("trial_id"), str)
             else None, METRIC: float(row[METRIC]), "hparams": row_hparams(row)}
            for i, (_, row) in enumerate(found.iterrows(), start=1)]
