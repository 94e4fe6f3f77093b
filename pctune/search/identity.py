"""A search's identity: the fingerprint of everything that changes what a trial's score means.

A run directory's ``job.json`` records the fingerprint of the job that made it (:func:`fingerprint`):
named fields for the model (name, spec, backbone) and its weights (paths and content digests, the
demo model's cached weights too), the data (source, path, subset, seed, size, unreadable rule, and a
digest of the prepared evaluation images and labels), the whole ``[objective]``, the search space (its
file's content digest and its description), and the search's strategy, grid, sampler, seed,
scheduler, starting points and defaults. ``--resume`` compares the job it is given with the recorded
one before anything in the run directory is written (:func:`check_resume`): trials scored under one
job are never ranked with trials of another.

Not part of it (a resumed search may change them): ``search.num_samples`` (a larger count extends the
search, a smaller one is refused), ``max_concurrent_trials``, ``resources``, ``cache_gb``, the storage
path and Ray address, tracking, promotion (except what a ``cam_iou`` objective takes from
``[promotion.explain]``, under ``[objective.cam]``'s keys) and verbosity.

Run directories of an older pctune record no fingerprint: their job.json's ``job`` (the job as the
search ran it) gives the configuration fields and ``space_description`` the space; those are compared,
the digests (weights, data, space file, spec) cannot be.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pctune.errors import PctuneError
from pctune.search.prepare import Prepared
from pctune.search.rundir import RunDir
from pctune.search.space import hparams_to_config
from pctune.search.trainable import digest_arrays

FORMAT = "pctune-fingerprint-v1"
_DATA = ("source", "path", "num_images", "seed", "image_size", "unreadable")
_SEARCH = ("strategy", "grid", "sampler", "seed", "scheduler", "grace_images", "reduction_factor",
           "starting_points", "defaults")
_MODEL = ("name", "backbone", "pretrained", "gradient_scaling")
#: job.json's record of what MLflow-named feedback weights resolved to (:mod:`pctune.lineage`)
LINEAGE_KEY = "feedback_weights_lineage"


def evaluation_arrays(prep: Prepared) -> dict:
    """The arrays every trial is scored on (the objective's: images or each condition's images, labels,
    masks): what the driver puts into Ray's object store, and what the data digest covers."""
    return prep.arrays


def fingerprint(prep: Prepared, data_key: str) -> dict[str, Any]:
    """The job's identity fields (``data_key``: :func:`digest_arrays` of :func:`evaluation_arrays`)."""
    job = prep.job
    fields = config_fields(asdict(job))
    spec = {k: v for k, v in asdict(prep.spec).items() if k not in ("source", "description")}
    fields["model.spec"] = _digest_text(json.dumps(spec, sort_keys=True, default=str))
    fields.update(_weights(job))
    fields["data.digest"] = data_key[:16]
    fields["search.space"] = _digest_file(job.space_path)
    fields["search.space_description"] = prep.space.describe()
    fields.update({key: _plain(value) for key, value in job.kinds.objective.identity(job).items()})
    return {"format": FORMAT, "fields": fields}


def config_fields(job: dict[str, Any]) -> dict[str, Any]:
    """The identity fields a job's configuration gives (``asdict(job)``, or an older job.json's ``job``)."""
    model, data, search = job.get("model", {}), job.get("data", {}), job.get("search", {})
    fields = {f"model.{k}": _plain(model[k]) for k in _MODEL if k in model}
    fields.update({f"data.{k}": _plain(data[k]) for k in _DATA if k in data})
    if data.get("path"):
        fields["data.path"] = str(Path(data["path"]).expanduser().resolve())
    fields.update({f"objective.{k}": _plain(v) for k, v in job.get("objective", {}).items()})
    fields.update({f"search.{k}": _plain(search[k]) for k in _SEARCH if k in search})
    return fields


def _weights(job) -> dict[str, str | None]:
    """Paths and content digests of the weights the model is built from (the demo's cached ones too)."""
    model = job.model
    if model.is_builtin_demo:
        from pctune.data.demo import ensure_demo_model

        paths = ensure_demo_model(log=lambda _m: None)
        return {"model.demo_weights": _digest_text(_digest_file(paths["backbone"]) + _digest_file(paths["feedback"]))}
    feedback = model.feedback_weights
    feedback = [feedback] if isinstance(feedback, str) else feedback
    named = None if feedback is None else " + ".join(_located(p) for p in feedback)
    if job.weights_lineage and feedback:  # named by MLflow: the version it resolved to, not the cache's path
        named = f"{job.weights_lineage['pinned']} ({_digest_file(Path(feedback[0]))})"
    return {"model.backbone_weights": _located(model.backbone_weights), "model.feedback_weights": named}


def _located(path: str | None) -> str | None:
    """``path (digest)``, or the weights' name when it is not a local file (a hub name)."""
    if path is None:
        return None
    local = Path(path).expanduser()
    return f"{local.resolve()} ({_digest_file(local)})" if local.exists() else str(path)


def _digest_file(path: Path) -> str:
    """A short content digest of a file, or of a folder's files (names and contents)."""
    h = hashlib.blake2b(digest_size=8)
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else "").encode())
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _digest_text(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _plain(value: Any) -> Any:
    """A JSON value that compares equal after a round trip through job.json (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


# -- the record ----------------------------------------------------------------------------------
def job_record(prep: Prepared, identity: dict[str, Any]) -> dict:
    """job.json: the job as the search runs it, with its fingerprint."""
    job = prep.job
    objective = job.kinds.objective  # RunDir.goal reads back the ranking's metric and direction
    return {"name": job.name, "source": str(Path(job.source).resolve()), "model": prep.spec.name,
            "num_pcoders": prep.net.num_pcoders, "space": str(job.space_path.resolve()),
            "space_description": prep.space.describe(), "strategy": job.search.strategy,
            "metric": objective.metric, "mode": objective.mode, "front": objective.front(),
            "penalty": prep.penalty, "num_images": len(prep.labels),
            "unreadable_images": prep.unreadable,
            "starting_points": [{"label": p.label, "config": hparams_to_config(p.hparams)}
                                for p in prep.starting_points],
            "fingerprint": identity, "job": {k: v for k, v in asdict(job).items() if k != "tables"},
            "tables": job.tables, LINEAGE_KEY: job.weights_lineage}


def recorded_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The identity fields job.json records: its fingerprint, or (an older pctune's run directory)
    what its ``job`` and ``space_description`` give."""
    saved = record.get("fingerprint")
    if isinstance(saved, dict) and saved.get("format") == FORMAT and isinstance(saved.get("fields"), dict):
        return saved["fields"]
    fields = config_fields(record.get("job") or {})
    if "space_description" in record:
        fields["search.space_description"] = record["space_description"]
    return fields


def check_resume(run_dir: RunDir, prep: Prepared, identity: dict[str, Any]) -> None:
    """``--resume`` of ``run_dir`` with the job of ``prep``: a one-line error naming every identity
    field that differs (old -> new), or a smaller ``--num-samples``; nothing is written."""
    try:
        record = run_dir.job_record()
    except PctuneError:  # already says which file is damaged and what to do
        raise
    except ValueError as exc:  # cut short or edited: what it held cannot be compared
        raise PctuneError(f"{run_dir / 'job.json'} is unreadable ({exc}): cannot check that --resume continues the "
                          "same job; pass --overwrite to start this job over") from exc
    if not isinstance(record, dict) or not record:
        return
    old, new = recorded_fields(record), identity["fields"]
    changed = [f"{key} {' -> '.join(_shown(old[key], new[key]))}" for key in sorted(old.keys() & new.keys())
               if old[key] != new[key]]
    if changed:
        raise PctuneError(f"{run_dir.path} holds a search of a different job ({'; '.join(changed)}): --resume "
                          "continues the same job only (a larger --num-samples may extend it); pass --overwrite "
                          "to start this job over, or use another --storage-path or job name")
    before = previous_num_samples(record)
    search = prep.job.search
    if prep.job.kinds.strategy.uses_num_samples and before is not None and search.num_samples < before:
        raise PctuneError(f"{run_dir.path}: --num-samples {search.num_samples} is smaller than the {before} this "
                          f"search was run with: resume with --num-samples {before} or more (more extends the search)")


def previous_num_samples(record: dict[str, Any]) -> int | None:
    value = ((record.get("job") or {}).get("search") or {}).get("num_samples")
    return int(value) if isinstance(value, int | float) else None


def _shown(old: Any, new: Any, width: int = 40) -> tuple[str, str]:
    """Two differing values, short: long ones from a little before where they first differ."""
    texts = [" ".join((v if isinstance(v, str) else json.dumps(v)).split()) for v in (old, new)]
    if max(len(t) for t in texts) <= width:
        return texts[0], texts[1]
    start = next((i for i, (a, b) in enumerate(zip(*texts, strict=False)) if a != b), min(map(len, texts)))
    start = max(0, start - 10)
    return tuple(("..." if start else "") + t[start:start + width] + ("..." if len(t) > start + width else "")
                 for t in texts)


__all__ = ["check_resume", "config_fields", "digest_arrays", "evaluation_arrays", "fingerprint", "job_record",
           "recorded_fields"]
