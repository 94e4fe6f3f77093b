"""The run directory of a search: what lives where, reading and writing it, and the one ranking.

Layout of ``<storage_path>/<job name>`` (default ``./pctune_runs/<job>``):

    job.json            the resolved job (model, space, data) as the search ran it
    references.json     scores of the feedforward baseline and the model's presets
    joint/              Ray Tune experiment (strategy "joint")
    pcoder1/ ...        one Ray Tune experiment per pcoder (strategies "per-pcoder", "single-pcoder-grid")
    combination.json    per-pcoder: the combined winners and their score
    sweep.csv, sweep.png      single-pcoder-grid: every grid point's score, and the heatmaps per pcoder
    .STAGE.early-stops.json   trials a scheduler (asha, hyperband) stopped before their last image
    .pctune-run         the manifest: what pctune wrote here (:mod:`pctune.search.manifest`)
    .pctune-lock        while a search, promotion or sync writes here (:mod:`pctune.search.runlock`)
    tracking.json       the search's MLflow identity (search id, tracking URI, experiment)
    search-state.json   whether the search is running, stopped or finished, and the trials it asks for
    leaderboard.csv, best.toml   written by ``pctune results`` (and at the end of a search)
    promotion/<rankN>/<stage>/   promotion results, one folder per promoted configuration

Trials are read straight from the Ray Tune experiment folders (each trial's ``params.json`` and
``result.json``), so a run directory can be read without Ray and while a search is still going.
"Which configuration won" is decided in one place, :meth:`RunDir.ranking`: the leaderboard and
``best.toml``, the promoted configurations and the MLflow champion all take it from there.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pctune.errors import PctuneError
from pctune.metrics import METRIC, MODE, of_condition
from pctune.pc.hyperparameters import Hyperparameters
from pctune.search import manifest
from pctune.search.conditions import pareto_front
from pctune.search.manifest import MARKER  # noqa: F401 (re-exported: where it was defined before)
from pctune.search.trials import (  # noqa: F401 (re-exported: where they were defined before)
    Trial,
    early_stops_path,
    is_final,
    last_result,
    load_trials,
    read_early_stops,
    read_results,
    record_early_stop,
)
from pctune.utils import atomic_write_json, atomic_write_text, first_line

JOB = "job.json"
REFERENCES = "references.json"
COMBINATION = "combination.json"
TRACKING = "tracking.json"
LEADERBOARD = "leaderboard.csv"
BEST = "best.toml"
SWEEP_CSV = "sweep.csv"
SWEEP_PNG = "sweep.png"
PROMOTION = "promotion"
SEARCH_STATE = "search-state.json"
SEARCH_STATES = ("running", "stopped", "finished")

_STAGE_DIR = re.compile(r"^(joint|pcoder(\d+))$")


@dataclass(frozen=True)
class Entry:
    """One scored configuration: a trial, a reference point or the per-pcoder combination."""

    kind: str  # "trial" | "reference" | "combination"
    name: str  # "joint/3", "pcoder2/0", "feedforward", "default", "per-pcoder winners"
    config: dict[str, Any]
    metrics: dict[str, Any]
    trial_id: str | None = None
    curve: tuple[tuple[int, float], ...] = ()  # a trial's (images seen, running mean_ce) reports

    @property
    def mean_ce(self) -> float:
        return float(self.metrics.get(METRIC, math.nan))

    def score(self, metric: str = METRIC) -> float:
        """The value of ``metric`` (the objective's: :meth:`RunDir.goal`), NaN when absent."""
        return float(self.metrics.get(metric, math.nan))

    @property
    def diverged(self) -> bool:
        return bool(self.metrics.get("diverged", 0))

    @property
    def feasible(self) -> bool:
        """Meets the robust objective's constraints (true where there are none)."""
        return bool(self.metrics.get("feasible", 1.0))

    @property
    def full_fidelity(self) -> bool:
        """Scored on every image (or diverged): a final score. A trial stopped early is not."""
        return is_final(self.metrics)

    @property
    def params(self) -> dict[str, float]:
        """The flat ``pcoder{n}.{beta,lambda,alpha}`` values, pcoder by pcoder."""
        return self.hparams.to_params()

    @property
    def hparams(self) -> Hyperparameters:
        return Hyperparameters.from_params(self.config)

    @property
    def key(self) -> str:
        """What identifies it across the run directory and MLflow: the trial id, else the kind
        ("combination") or the reference's name."""
        return self.trial_id or ("combination" if self.kind == "combination" else self.name)


class RunDir:
    """A search's run directory (see the module docstring for its layout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- ownership ----------------------------------------------------------------------------------
    def mark(self) -> None:
        """Claim the folder as a pctune run directory (creating it), its manifest started
        (:mod:`pctune.search.manifest`)."""
        manifest.mark(self.path)

    def register(self, name: str) -> Path:
        """Record in the manifest that pctune creates ``name`` (a top-level file or folder, or a path
        under one); every writer of the run directory goes through this. Returns its path."""
        manifest.register(self.path, name)
        return self.path / name

    # -- the job record -----------------------------------------------------------------------------
    def has_search(self) -> bool:
        return (self.path / JOB).is_file()

    def require_search(self, job_name: str) -> None:
        if not self.has_search():
            raise PctuneError(f"no search of {job_name} in {self.path} (run `pctune search {job_name}` first)")

    def job_record(self) -> dict[str, Any]:
        return self.read_json(JOB, dict) or {}

    @property
    def timesteps(self) -> int:
        return int(self.job_record()["job"]["objective"]["timesteps"])

    def goal(self) -> tuple[str, str]:
        """The metric the search optimized and its direction, as its job.json records them (the job's
        objective's; searches from before ``cam_iou``: ``("mean_ce", "min")``)."""
        record = self.job_record()
        return str(record.get("metric", METRIC)), str(record.get("mode", MODE))

    def job(self, fallback=None):
        """The typed job as the search ran it (:class:`pctune.search.job.Job`, read back from the tables
        job.json records), or ``fallback`` for a run directory of an older pctune that records none, or
        whose job this process cannot read back (an objective registered by another program, say)."""
        from pctune.search.job import job_from_mapping

        record = self.job_record()
        if not isinstance(record.get("tables"), dict) or not record["tables"]:
            return fallback
        try:
            return job_from_mapping(record["tables"], source=str(record.get("source", self.path / JOB)),
                                    name=str(record.get("name", self.path.name)))
        except PctuneError:
            return fallback

    # -- the search's state ----------------------------------------------------------------------------
    def record_search_state(self, state: str, expected_trials: int) -> None:
        """What the driver says of its search: ``running`` (also what a killed driver leaves),
        ``stopped`` (interrupted or failed) or ``finished``, and how many trials it asks for."""
        assert state in SEARCH_STATES, state
        self.write_json(SEARCH_STATE, {"state": state, "expected_trials": int(expected_trials)})

    def search_progress(self) -> tuple[int, int]:
        """(trials ended, trials the search asks for): from search-state.json, or (a run of an older
        pctune) from job.json's num_samples per stage (a grid sweep: the trials on disk)."""
        ended = sum(1 for s in self.stages() for t in self.trials(s) if t.status in ("TERMINATED", "ERROR"))
        state = self.read_json(SEARCH_STATE) or {}
        if "expected_trials" in state:
            return ended, int(state["expected_trials"])
        from pctune.search.strategies import strategy

        record = self.job_record()
        planned = strategy(record.get("strategy"))
        stages = int(record.get("num_pcoders", 1)) if planned.per_pcoder else 1
        if not planned.uses_num_samples:  # a grid: the points on disk, a stage not started counts one
            return ended, sum(len(self.trials(s)) for s in self.stages()) + stages - min(stages, len(self.stages()))
        return ended, stages * int(record.get("job", {}).get("search", {}).get("num_samples", 0))

    def search_complete(self) -> bool:
        """Did the search run to its end? Its recorded state says so (``finished``); a run directory of
        an older pctune: every trial it asks for ended (and the per-pcoder combination is scored)."""
        state = self.read_json(SEARCH_STATE)
        if state is not None:
            return state.get("state") == "finished"
        from pctune.search.strategies import strategy

        ended, expected = self.search_progress()
        combines = strategy(self.job_record().get("strategy")).combines
        return ended >= expected > 0 and (not combines or (self.path / COMBINATION).is_file())

    # -- files ----------------------------------------------------------------------------------------
    def read_json(self, name: str, kind: type | None = None) -> Any:
        """A JSON file of the run (None when absent); a damaged one (not JSON, or not a ``kind``) is a
        one-line error naming it and how to recover."""
        path = self.path / name
        if not path.is_file():
            return None
        try:
            value = json.loads(path.read_text())
        except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _damaged(path, first_line(exc)) from exc
        if kind is not None and not isinstance(value, kind):
            raise _damaged(path, f"expected a JSON {'object' if kind is dict else kind.__name__}")
        return value

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.register(name), obj)

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.register(name), text)

    # -- the MLflow identity ---------------------------------------------------------------------------
    def tracking_identity(self, uri: str, experiment: str) -> dict[str, str]:
        """The search's tracking identity (search id, URI, experiment), kept here so that resume and
        sync find the same parent run (a new search of the job, after ``--overwrite``, gets a new one)."""
        state = self.read_json(TRACKING) or {"search_id": uuid.uuid4().hex}
        state.update(uri=uri, experiment=experiment)
        self.write_json(TRACKING, state)
        return state

    def tracking_uri(self) -> str | None:
        """The tracking URI the search last used, if any."""
        return (self.read_json(TRACKING) or {}).get("uri")

    # -- trials ---------------------------------------------------------------------------------------
    def stages(self) -> list[str]:
        """The Tune experiments present: ``joint``, or ``pcoder1``, ``pcoder2``, ... in order."""
        if not self.path.is_dir():
            return []
        found = [m for p in self.path.iterdir() if p.is_dir() and (m := _STAGE_DIR.match(p.name))]
        return [m.group(0) for m in sorted(found, key=lambda m: int(m.group(2) or 0))]

    def trials(self, stage: str) -> list[Trial]:
        return load_trials(self.path / stage)

    def finished_trials(self, stage: str | None = None) -> list[tuple[str, Trial]]:
        """(stage, trial) for every trial with a result, stage by stage (or of ``stage`` only)."""
        stages = self.stages() if stage is None else [stage]
        return [(s, t) for s in stages for t in self.trials(s) if t.finished]

    def references(self) -> dict[str, dict]:
        """name -> ``{"config", "metrics"}`` of the reference points (feedforward, presets)."""
        return self.read_json(REFERENCES, dict) or {}

    # -- the ranking --------------------------------------------------------------------------------
    def entries(self, stage: str | None = None) -> list[Entry]:
        """Every scored configuration: finished trials, then references, then the combination; with
        ``stage``, the finished trials of that Tune experiment only."""
        entries = [Entry("trial", f"{s}/{t.index}", t.config, t.metrics, t.trial_id, t.curve)
                   for s, t in self.finished_trials(stage)]
        if stage is not None:
            return entries
        entries += [Entry("reference", name, ref["config"], ref["metrics"]) for name, ref in self.references().items()]
        combination = self.read_json(COMBINATION)
        if combination:
            entries.append(Entry("combination", "per-pcoder winners", combination["config"], combination["metrics"]))
        return entries

    def ranking(self, stage: str | None = None) -> list[Entry]:
        """THE ranking (:func:`rank`) of this run directory's entries; with ``stage``, of the trials of
        that Tune experiment only (a per-pcoder stage's winner)."""
        return rank(self.entries(stage), self.front(), self.goal())

    def front(self) -> list[str]:
        """The objectives of a Pareto search (``mean_ce_<condition>``), else none: as job.json records
        them (a run directory of an older pctune: from its objective's ``combine`` and ``pareto``)."""
        record = self.job_record()
        if "front" in record:
            return list(record["front"])
        objective = record.get("job", {}).get("objective", {})
        if objective.get("combine") != "pareto":
            return []
        return [of_condition(METRIC, name) for name in objective.get("pareto", [])]

    def best(self, stage: str | None = None) -> Entry | None:
        return next(iter(self.ranking(stage)), None)


def rank(entries: list[Entry], front: Sequence[str] = (), goal: tuple[str, str] = (METRIC, MODE)) -> list[Entry]:
    """THE ranking: the searched configurations among ``entries`` (trials and the per-pcoder
    combination; never a reference, never a diverged point, never a trial stopped before its last
    image, never one that breaks the objective's constraints), best score first (``goal``: the metric
    and "min" or "max", :meth:`RunDir.goal`); ties keep their order. With ``front`` (a Pareto search's
    objectives), the Pareto front of the ranked ones comes first, by the first objective, then the
    others by the first objective."""
    if not front:
        metric, sign = goal[0], (1.0 if goal[1] == "min" else -1.0)
        return sorted(_rankable(entries, metric), key=lambda e: sign * e.score(metric))
    first = front[0]
    ranked = sorted(_with_front(entries, front),
                    key=lambda pair: (not pair[1], float(pair[0].metrics.get(first, math.inf))))
    return [e for e, _ in ranked]


def front_members(entries: list[Entry], front: Sequence[str]) -> set[int]:
    """``id()`` of the ranked entries on the Pareto front of ``front`` (empty without ``front``)."""
    return {id(e) for e, on in _with_front(entries, front) if on} if front else set()


def _rankable(entries: list[Entry], metric: str = METRIC) -> list[Entry]:
    return [e for e in entries if e.kind != "reference" and not e.diverged and e.full_fidelity
            and math.isfinite(e.score(metric)) and e.feasible]


def _with_front(entries: list[Entry], front: Sequence[str]) -> list[tuple[Entry, bool]]:
    """The rankable entries, each with whether it is on the Pareto front of the ``front`` metrics."""
    found = _rankable(entries)
    on_front = pareto_front([[float(e.metrics.get(m, math.nan)) for m in front] for e in found])
    return list(zip(found, on_front, strict=True))


def _damaged(path: Path, why: str) -> PctuneError:
    return PctuneError(f"{path}: damaged ({why}); restore it from a backup, or run the search again with --overwrite")
