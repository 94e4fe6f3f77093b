"""Search jobs (``jobs/*.toml``): the model, the data, the objective, the search and where results go.

Every table and key is checked; an error names the file, the table and the key. Command-line flags
override fields before validation (:func:`load_job` with ``overrides={"search.num_samples": 8}``).
Relative paths in a job are taken relative to the current directory.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pctune.errors import PctuneError
from pctune.models.spec import read_toml

SAMPLERS = ("tpe", "cmaes", "gp", "random")
STRATEGIES = ("joint", "per-pcoder")
DATA_SOURCES = ("imagenet-val", "digits")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ModelConfig:
    name: str
    pretrained: bool = False
    backbone_weights: str | None = None
    feedback_weights: str | list[str] | None = None
    gradient_scaling: bool | None = None

    @property
    def is_builtin_demo(self) -> bool:
        """The embedded demo model, trained and cached by pctune itself."""
        return self.name == "demo" and self.backbone_weights is None and self.feedback_weights is None


@dataclass
class DataConfig:
    source: str = "imagenet-val"
    path: str | None = None
    num_images: int = 2000
    seed: int = 0
    image_size: int | None = None
    workers: int = 2


@dataclass
class ObjectiveConfig:
    sigma: float = 0.5
    timesteps: int = 4
    batch_size: int = 100
    noise_seed: int | None = None  # default: data.seed
    divergence_penalty: float | None = None  # default: 10 * ln(number of classes)


@dataclass
class SearchConfig:
    space: str
    sampler: str = "tpe"
    num_samples: int = 100
    max_concurrent_trials: int = 1
    seed: int = 0
    strategy: str = "joint"
    defaults: str = "default"  # per-pcoder: the model preset the other pcoders stay at
    starting_points: list[Any] = field(default_factory=lambda: ["default"])
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0, "gpu": 0.0})


@dataclass
class RunConfig:
    storage_path: str = "pctune_runs"
    address: str | None = None
    if_exists: str = "error"  # "error" or "overwrite" an earlier search of this job
    verbose: bool = False  # Ray Tune's own status tables besides pctune's one line per trial


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None
    experiment: str | None = None


PROMOTION_STAGES = ("imagenet-c", "adversarial", "noise")


@dataclass
class PromotionConfig:
    top_k: int = 5
    stages: list[Any] = field(default_factory=list)
    auto: bool = True  # run the stages when the search ends (else: `pctune promote JOB`)
    # per-stage settings: [promotion.imagenet-c], [promotion.adversarial], [promotion.noise]
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Job:
    name: str
    source: str
    model: ModelConfig
    data: DataConfig
    objective: ObjectiveConfig
    search: SearchConfig
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    resume: bool = False

    @property
    def run_dir(self) -> Path:
        """Where this job's experiments, references and results live."""
        return (Path(self.run.storage_path).expanduser() / self.name).resolve()

    @property
    def space_path(self) -> Path:
        return resolve_space_path(self.search.space, Path(self.source))


# -- locating files -----------------------------------------------------------------------------
def resolve_job_path(name_or_path: str | Path) -> Path:
    """A job given as a path, or by name in ``./jobs`` or pctune's own ``jobs/`` folder."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file() or len(path.parts) > 1:
        if not path.is_file():
            raise PctuneError(f"{path}: no such job file")
        return path
    candidates = [Path("jobs") / f"{name_or_path}.toml", REPO_ROOT / "jobs" / f"{name_or_path}.toml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for folder in (Path("jobs"), REPO_ROOT / "jobs") if folder.is_dir()
                    for p in folder.glob("*.toml")})
    raise PctuneError(f"unknown job {str(name_or_path)!r}; known jobs: {', '.join(known) or 'none'}")


def resolve_space_path(space: str, job_file: Path) -> Path:
    """A search space given as a path (relative to the job file or the current directory) or by
    name in ``search_spaces/`` (next to the job's folder, in the current directory, or pctune's own)."""
    path = Path(space)
    if path.suffix == ".toml" or len(path.parts) > 1:
        for candidate in (job_file.parent / path, path):
            if candidate.is_file():
                return candidate
        raise PctuneError(f"{job_file}: search.space: no such file {space!r}")
    folders = [job_file.parent.parent / "search_spaces", Path("search_spaces"), REPO_ROOT / "search_spaces"]
    for folder in folders:
        if (folder / f"{space}.toml").is_file():
            return folder / f"{space}.toml"
    raise PctuneError(f"{job_file}: search.space: unknown search space {space!r} (looked in "
                      f"{', '.join(str(f) for f in folders)})")


# -- loading ------------------------------------------------------------------------------------
def load_job(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> Job:
    """Read and validate a job; ``overrides`` maps dotted keys (``search.num_samples``) to values."""
    path = resolve_job_path(name_or_path)
    data = copy.deepcopy(read_toml(path))
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, key, value, str(path))
    return job_from_mapping(data, source=str(path), name=path.stem)


def set_dotted(data: dict, key: str, value: Any, where: str = "<job>") -> None:
    parts = key.split(".")
    table = data
    for part in parts[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise PctuneError(f"{where}: cannot set {key}: {part} is not a table")
    table[parts[-1]] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"search.sampler=cmaes"`` -> ``("search.sampler", "cmaes")``; the value is read as a TOML value
    (numbers, booleans, lists, quoted strings) and otherwise kept as a string."""
    if "=" not in text:
        raise PctuneError(f"--set {text!r}: expected KEY=VALUE")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def job_from_mapping(data: Mapping[str, Any], source: str = "<job>", name: str = "job") -> Job:
    known = {"name", "description", "model", "data", "objective", "search", "run", "tracking", "promotion"}
    _no_unknown(data, known, source)
    reader = _Reader(source)
    job = Job(
        name=reader.value(data, "name", str, name, "job"),
        source=source,
        model=_model(reader, reader.table(data, "model", required=True)),
        data=_data(reader, reader.table(data, "data")),
        objective=_objective(reader, reader.table(data, "objective")),
        search=_search(reader, reader.table(data, "search", required=True)),
        run=_run(reader, reader.table(data, "run")),
        tracking=_tracking(reader, reader.table(data, "tracking")),
        promotion=_promotion(reader, reader.table(data, "promotion")),
    )
    if job.data.source == "imagenet-val" and not job.data.path:
        raise PctuneError(f"{source}: data.path: the ImageNet validation folder is required "
                          "(or pass --data PATH)")
    return job


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def table(self, data: Mapping, key: str, required: bool = False) -> tuple[str, Mapping]:
        if key not in data:
            if required:
                raise PctuneError(f"{self.source}: missing table [{key}]")
            return key, {}
        if not isinstance(data[key], Mapping):
            raise PctuneError(f"{self.source}: {key} must be a table")
        return key, data[key]

    def value(self, table: Mapping, key: str, kind, default: Any, where: str, required: bool = False) -> Any:
        if key not in table:
            if required:
                raise PctuneError(f"{self.source}: {where}.{key}: missing")
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise PctuneError(f"{self.source}: {where}.{key}: expected {_kind_name(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise PctuneError(f"{self.source}: {where}.{key}: expected {_kind_name(kinds)}, got {value!r}")
        return value

    def error(self, where: str, message: str) -> PctuneError:
        return PctuneError(f"{self.source}: {where}: {message}")


def _kind_name(kinds: tuple) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _no_unknown(table: Mapping, known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise PctuneError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")


def _model(r: _Reader, item: tuple[str, Mapping]) -> ModelConfig:
    where, t = item
    _no_unknown(t, {"name", "pretrained", "backbone_weights", "feedback_weights", "gradient_scaling"},
                f"{r.source}: [{where}]")
    feedback = r.value(t, "feedback_weights", (str, list), None, where)
    return ModelConfig(
        name=r.value(t, "name", str, None, where, required=True),
        pretrained=r.value(t, "pretrained", bool, False, where),
        backbone_weights=r.value(t, "backbone_weights", str, None, where) or None,
        feedback_weights=feedback or None,
        gradient_scaling=r.value(t, "gradient_scaling", bool, None, where),
    )


def _data(r: _Reader, item: tuple[str, Mapping]) -> DataConfig:
    where, t = item
    _no_unknown(t, {"source", "path", "num_images", "seed", "image_size", "workers"}, f"{r.source}: [{where}]")
    cfg = DataConfig(
        source=r.value(t, "source", str, "imagenet-val", where),
        path=r.value(t, "path", str, None, where) or None,
        num_images=r.value(t, "num_images", int, 2000, where),
        seed=r.value(t, "seed", int, 0, where),
        image_size=r.value(t, "image_size", int, None, where),
        workers=r.value(t, "workers", int, 2, where),
    )
    if cfg.source not in DATA_SOURCES:
        raise r.error(f"{where}.source", f"unknown data source {cfg.source!r} ({', '.join(DATA_SOURCES)})")
    if cfg.num_images <= 0:
        raise r.error(f"{where}.num_images", f"must be > 0, got {cfg.num_images}")
    return cfg


def _objective(r: _Reader, item: tuple[str, Mapping]) -> ObjectiveConfig:
    where, t = item
    _no_unknown(t, {"sigma", "timesteps", "batch_size", "noise_seed", "divergence_penalty"},
                f"{r.source}: [{where}]")
    cfg = ObjectiveConfig(
        sigma=r.value(t, "sigma", float, 0.5, where),
        timesteps=r.value(t, "timesteps", int, 4, where),
        batch_size=r.value(t, "batch_size", int, 100, where),
        noise_seed=r.value(t, "noise_seed", int, None, where),
        divergence_penalty=r.value(t, "divergence_penalty", float, None, where),
    )
    if cfg.sigma < 0:
        raise r.error(f"{where}.sigma", f"must be >= 0, got {cfg.sigma}")
    if cfg.timesteps < 1:
        raise r.error(f"{where}.timesteps", f"must be >= 1 (the score averages t = 1..T), got {cfg.timesteps}")
    if cfg.batch_size < 1:
        raise r.error(f"{where}.batch_size", f"must be >= 1, got {cfg.batch_size}")
    return cfg


def _search(r: _Reader, item: tuple[str, Mapping]) -> SearchConfig:
    where, t = item
    _no_unknown(t, {"space", "sampler", "num_samples", "max_concurrent_trials", "seed", "strategy",
                    "defaults", "starting_points", "resources"}, f"{r.source}: [{where}]")
    cfg = SearchConfig(
        space=r.value(t, "space", str, None, where, required=True),
        sampler=r.value(t, "sampler", str, "tpe", where),
        num_samples=r.value(t, "num_samples", int, 100, where),
        max_concurrent_trials=r.value(t, "max_concurrent_trials", int, 1, where),
        seed=r.value(t, "seed", int, 0, where),
        strategy=r.value(t, "strategy", str, "joint", where),
        defaults=r.value(t, "defaults", str, "default", where),
        starting_points=list(r.value(t, "starting_points", list, ["default"], where)),
        resources=_resources(r, t.get("resources", {}), f"{where}.resources"),
    )
    if cfg.sampler not in SAMPLERS:
        raise r.error(f"{where}.sampler", f"unknown sampler {cfg.sampler!r} ({', '.join(SAMPLERS)})")
    if cfg.strategy not in STRATEGIES:
        raise r.error(f"{where}.strategy", f"unknown strategy {cfg.strategy!r} ({', '.join(STRATEGIES)})")
    if cfg.num_samples < 1:
        raise r.error(f"{where}.num_samples", f"must be >= 1, got {cfg.num_samples}")
    if cfg.max_concurrent_trials < 1:
        raise r.error(f"{where}.max_concurrent_trials", f"must be >= 1, got {cfg.max_concurrent_trials}")
    for i, point in enumerate(cfg.starting_points, start=1):
        if not isinstance(point, str | Mapping):
            raise r.error(f"{where}.starting_points[{i}]", f"expected a preset name or a table, got {point!r}")
    return cfg


def _resources(r: _Reader, table: Any, where: str) -> dict[str, float]:
    if not isinstance(table, Mapping):
        raise r.error(where, "must be a table such as { cpu = 1, gpu = 0.25 }")
    _no_unknown(table, {"cpu", "gpu"}, f"{r.source}: [{where}]")
    resources = {"cpu": r.value(table, "cpu", float, 1.0, where), "gpu": r.value(table, "gpu", float, 0.0, where)}
    for key, value in resources.items():
        if value < 0:
            raise r.error(f"{where}.{key}", f"must be >= 0, got {value}")
    if resources["gpu"] > 1 and resources["gpu"] != int(resources["gpu"]):
        raise r.error(f"{where}.gpu", f"fractions are allowed only below 1, got {resources['gpu']}")
    return resources


def _run(r: _Reader, item: tuple[str, Mapping]) -> RunConfig:
    where, t = item
    _no_unknown(t, {"storage_path", "address", "if_exists", "verbose"}, f"{r.source}: [{where}]")
    cfg = RunConfig(
        storage_path=r.value(t, "storage_path", str, "pctune_runs", where),
        address=r.value(t, "address", str, None, where) or None,
        if_exists=r.value(t, "if_exists", str, "error", where),
        verbose=r.value(t, "verbose", bool, False, where),
    )
    if cfg.if_exists not in ("error", "overwrite"):
        raise r.error(f"{where}.if_exists", f"must be 'error' or 'overwrite', got {cfg.if_exists!r}")
    return cfg


def _tracking(r: _Reader, item: tuple[str, Mapping]) -> TrackingConfig:
    where, t = item
    _no_unknown(t, {"tracking_uri", "experiment"}, f"{r.source}: [{where}]")
    return TrackingConfig(tracking_uri=r.value(t, "tracking_uri", str, None, where) or None,
                          experiment=r.value(t, "experiment", str, None, where) or None)


def _promotion(r: _Reader, item: tuple[str, Mapping]) -> PromotionConfig:
    where, t = item
    _no_unknown(t, {"top_k", "stages", "auto", *PROMOTION_STAGES}, f"{r.source}: [{where}]")
    cfg = PromotionConfig(top_k=r.value(t, "top_k", int, 5, where), stages=list(r.value(t, "stages", list, [], where)),
                          auto=r.value(t, "auto", bool, True, where),
                          settings={s: dict(r.value(t, s, dict, {}, where)) for s in PROMOTION_STAGES})
    if cfg.top_k < 1:
        raise r.error(f"{where}.top_k", f"must be >= 1, got {cfg.top_k}")
    for stage in cfg.stages:
        if stage not in PROMOTION_STAGES:
            raise r.error(f"{where}.stages", f"unknown stage {stage!r} (known: {', '.join(PROMOTION_STAGES)})")
    return cfg
