"""Search jobs (``jobs/*.toml``): the model, the data, the objective, the search and where results go.

Each table's keys, types and defaults are stated once, in its dataclass below (``[model]`` is
:class:`ModelConfig`, ...); :mod:`pctune.schema` reads a table into it, so every key is checked and an
error names the file, the table and the key. The ``[promotion.STAGE]`` tables are the typed settings
of :mod:`pctune.evaluate.settings`. Command-line flags override fields before validation
(:func:`load_job` with ``overrides={"search.num_samples": 8}``). Relative paths in a job are taken
relative to the current directory; jobs and search spaces are found by :mod:`pctune.search.locate`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pctune.data.sources import DATA_SOURCES
from pctune.errors import PctuneError
from pctune.evaluate.settings import (
    STAGE_SETTINGS,
    AdversarialSettings,
    ImagenetCSettings,
    NoiseSettings,
    parse_stage_settings,
)
from pctune.models.spec import read_toml
from pctune.schema import at_least, convert, error, no_unknown, read_table
from pctune.search.conditions import RobustObjective, read_robust
from pctune.search.grid import GridSpec, read_grid
from pctune.search.kinds import Kinds, check_compatible, read_kinds
from pctune.search.locate import REPO_ROOT, resolve_job_path, resolve_space_path  # noqa: F401 (re-exported)
from pctune.search.objectives import OBJECTIVES
from pctune.search.overrides import has_dotted, parse_assignment, set_dotted  # noqa: F401 (re-exported)
from pctune.search.samplers import SAMPLERS
from pctune.search.schedulers import SCHEDULERS
from pctune.search.strategies import STRATEGIES

IF_EXISTS = ("error", "overwrite")


@dataclass
class ModelConfig:
    name: str
    pretrained: bool = False
    backbone_weights: str | None = None
    feedback_weights: str | list[str] | None = None
    gradient_scaling: bool | None = None
    backbone: str | None = None  # a Predify configuration's backbone, e.g. "torchvision/vgg16"

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
    unreadable: str = "skip"  # an image that cannot be decoded: "skip" it (listed in the results) or "fail"


@dataclass
class ObjectiveConfig:
    sigma: float = 0.5
    timesteps: int = 4
    batch_size: int = 100
    noise_seed: int | None = None  # default: data.seed
    divergence_penalty: float | None = None  # default: 10 * ln(number of classes)
    # Robust objectives (pctune.search.conditions): several perturbations of the same images, combined.
    # Without conditions: the paper's objective (sigma, timesteps above), exactly as before.
    conditions: list[Any] = field(default_factory=list)  # [[objective.conditions]] tables
    combine: str = "aggregate"  # "aggregate" | "constraints" | "pareto"
    constraints: list[Any] = field(default_factory=list)  # [[objective.constraints]] tables
    pareto: list[str] = field(default_factory=list)  # combine = "pareto": 2 or 3 condition names
    # What is optimized (pctune.search.objectives.OBJECTIVES): the paper's "cross_entropy", or "cam_iou":
    # the Grad-CAM IoU against object masks at t = T ("last") or averaged over t = 1..T ("mean"), maximized;
    # masks, thresholds and the gradient mode: [objective.cam], else the explain stage's ([promotion.explain])
    kind: str = "cross_entropy"
    cam_timesteps: str = "last"
    cam: dict[str, Any] = field(default_factory=dict)  # [objective.cam] (pctune.search.objectives.cam_iou)

    def robust(self, source: str = "<job>") -> RobustObjective | None:
        """The parsed conditions (None: the paper's single condition)."""
        return read_robust(self.conditions, self.combine, self.constraints, self.pareto, self.timesteps, source)

    def goal(self) -> tuple[str, str]:
        """THE metric a search of this objective optimizes and its direction (its objective class's:
        ``job.kinds.objective``); the ranking and the champion follow it through job.json."""
        cls = OBJECTIVES[self.kind]
        return cls.metric, cls.mode


@dataclass
class SearchConfig:
    space: str
    sampler: str = "tpe"
    num_samples: int = 100
    max_concurrent_trials: int = 1
    seed: int = 0
    strategy: str = "joint"  # "joint" | "per-pcoder" | "single-pcoder-grid" (pctune.search.grid)
    defaults: str = "default"  # per-pcoder: the model preset the other pcoders stay at
    grid: GridSpec | None = None  # single-pcoder-grid: { beta = [...], lambda = [...], points = N }
    starting_points: list[Any] = field(default_factory=lambda: ["default"])
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0, "gpu": 0.0})
    # Multi-fidelity over images (pctune.search.schedulers): "fifo" scores every trial on every image;
    # "asha" / "hyperband" stop unpromising trials early, at images seen = grace_images x reduction_factor^k.
    scheduler: str = "fifo"
    grace_images: int | None = None  # default: the images / reduction_factor^3, rounded up
    reduction_factor: float = 3.0
    cache_gb: float = 1.0  # per worker: timestep-0 results kept for reuse by later trials (0: off)


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


@dataclass
class Resources:
    """``[search] resources``: what one trial asks Ray for (kept as a dict in :class:`SearchConfig`)."""

    cpu: float = 1.0
    gpu: float = 0.0  # fractions below 1 share a GPU


@dataclass
class PromotionConfig:
    top_k: int = 5
    stages: list[Any] = field(default_factory=list)
    auto: bool = True  # run the stages when the search ends (else: `pctune promote JOB`)
    # per-stage settings, one entry for every stage of STAGE_SETTINGS (defaults when its table is absent):
    # [promotion.imagenet-c], [promotion.adversarial], [promotion.noise]
    settings: dict[str, NoiseSettings | ImagenetCSettings | AdversarialSettings] = field(
        default_factory=lambda: {stage: cls() for stage, cls in STAGE_SETTINGS.items()})


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
    # the TOML tables it was read from (flags applied): job.json records them, RunDir.job reads them back
    tables: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # feedback weights named by MLflow: what the URI resolved to (pctune.lineage; job.json records it)
    weights_lineage: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @cached_property
    def kinds(self) -> Kinds:
        """The job's objective, strategy, scheduler, sampler and data source as typed records, parsed once
        (:mod:`pctune.search.kinds`)."""
        return read_kinds(self, self.source)

    @property
    def run_dir(self) -> Path:
        """Where this job's experiments, references and results live."""
        return (Path(self.run.storage_path).expanduser() / self.name).resolve()

    @property
    def space_path(self) -> Path:
        return resolve_space_path(self.search.space, Path(self.source))


# -- loading ------------------------------------------------------------------------------------
def load_job(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> Job:
    """Read and validate a job; ``overrides`` maps dotted keys (``search.num_samples``) to values."""
    path = resolve_job_path(name_or_path)
    written = read_toml(path)
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    _check_replaced_values(written, given, path)
    data = copy.deepcopy(written)
    for key, value in given.items():
        set_dotted(data, key, value, str(path))
    return job_from_mapping(data, source=str(path), name=path.stem)


def _check_replaced_values(written: Mapping, given: Mapping[str, Any], path: Path) -> None:
    """A flag must not hide an invalid value in the file: check the file with only the other flags
    applied, and report an error about a value a flag replaces (other errors may be what flags fix)."""
    replaced = [key for key in given if has_dotted(written, key)]
    if not replaced:
        return
    data = copy.deepcopy(written)
    for key, value in given.items():
        if key not in replaced:
            set_dotted(data, key, value, str(path))
    try:
        job_from_mapping(data, source=str(path), name=path.stem)
    except PctuneError as exc:
        if any(f"{key}:" in str(exc) for key in replaced):
            raise


#: a job's top-level keys besides its tables
JOB_KEYS = ("name", "description")
#: [table] -> its dataclass
TABLES = {"model": ModelConfig, "data": DataConfig, "objective": ObjectiveConfig, "search": SearchConfig,
          "run": RunConfig, "tracking": TrackingConfig, "promotion": PromotionConfig}
REQUIRED_TABLES = ("model", "search")


def job_from_mapping(data: Mapping[str, Any], source: str = "<job>", name: str = "job") -> Job:
    """A job from its TOML tables, every key and value checked (``source`` names the file in errors)."""
    no_unknown(data, [*JOB_KEYS, *TABLES], source)
    for key in REQUIRED_TABLES:
        if key not in data:
            raise PctuneError(f"{source}: missing table [{key}]")
    convert(str, data.get("description", ""), source, "description")
    tables = {key: data.get(key, {}) for key in TABLES}
    job = Job(
        name=_job_name(convert(str, data.get("name", name), source, "name"), source),
        source=source,
        model=_model(tables["model"], source),
        data=_data(tables["data"], source),
        objective=_objective(tables["objective"], source),
        search=_search(tables["search"], source),
        run=_run(tables["run"], source),
        tracking=read_table(TrackingConfig, tables["tracking"], source, "tracking"),
        promotion=_promotion(tables["promotion"], source),
        tables=copy.deepcopy(dict(data)),
    )
    check_compatible(job, source)  # parses job.kinds
    return job


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")
MAX_NAME_LENGTH = 100  # a folder name: well below 255 bytes, with room for the files named after it


def _job_name(name: str, source: str) -> str:
    """A job's name is its run directory's name under the storage path: a plain name, nothing that
    could point elsewhere."""
    if not _PLAIN_NAME.fullmatch(name) or name in (".", ".."):
        raise PctuneError(f"{source}: name: {name!r} is not a plain name (letters, digits, '-', '_', '.'; "
                          "not empty, not '.' or '..')")
    if len(name) > MAX_NAME_LENGTH:
        raise error(source, "name", f"too long: {len(name)} characters (at most {MAX_NAME_LENGTH}: the run folder)")
    return name


# -- one reader per table: the dataclass states keys, types and defaults; these add the range checks --
def _model(table: Any, source: str) -> ModelConfig:
    cfg = read_table(ModelConfig, table, source, "model")
    cfg.feedback_weights = cfg.feedback_weights or None  # "" or []: none
    return cfg


def _data(table: Any, source: str) -> DataConfig:
    cfg = read_table(DataConfig, table, source, "data")
    if cfg.source not in DATA_SOURCES:
        raise error(source, "data.source", f"unknown data source {cfg.source!r} ({', '.join(DATA_SOURCES)})")
    if cfg.num_images <= 0:
        raise error(source, "data.num_images", f"must be > 0, got {cfg.num_images}")
    at_least(cfg.image_size, 1, source, "data.image_size")
    at_least(cfg.workers, 0, source, "data.workers")
    if cfg.unreadable not in ("skip", "fail"):
        raise error(source, "data.unreadable", f"must be 'skip' or 'fail', got {cfg.unreadable!r}")
    return cfg


def _objective(table: Any, source: str) -> ObjectiveConfig:
    cfg = read_table(ObjectiveConfig, table, source, "objective")
    at_least(cfg.sigma, 0, source, "objective.sigma")
    at_least(cfg.timesteps, 1, source, "objective.timesteps", " (the score averages t = 1..T)")
    at_least(cfg.batch_size, 1, source, "objective.batch_size")
    cfg.robust(source)  # checks the conditions, the combination and the constraints
    return cfg


def _search(table: Any, source: str) -> SearchConfig:
    cfg = read_table(SearchConfig, table, source, "search",
                     readers={"resources": lambda value, where: _resources(value, source, where),
                              "grid": lambda value, where: read_grid(value, source, where)})
    if cfg.sampler not in SAMPLERS:
        raise error(source, "search.sampler", f"unknown sampler {cfg.sampler!r} ({', '.join(SAMPLERS)})")
    if cfg.strategy not in STRATEGIES:
        raise error(source, "search.strategy", f"unknown strategy {cfg.strategy!r} ({', '.join(STRATEGIES)})")
    at_least(cfg.num_samples, 1, source, "search.num_samples")
    at_least(cfg.max_concurrent_trials, 1, source, "search.max_concurrent_trials")
    if cfg.scheduler not in SCHEDULERS:
        raise error(source, "search.scheduler", f"unknown scheduler {cfg.scheduler!r} ({', '.join(SCHEDULERS)})")
    at_least(cfg.grace_images, 1, source, "search.grace_images")
    if cfg.reduction_factor <= 1:
        raise error(source, "search.reduction_factor", f"must be > 1, got {cfg.reduction_factor}")
    at_least(cfg.cache_gb, 0, source, "search.cache_gb")
    for i, point in enumerate(cfg.starting_points, start=1):
        if not isinstance(point, str | Mapping):
            raise error(source, f"search.starting_points[{i}]", f"expected a preset name or a table, got {point!r}")
    STRATEGIES[cfg.strategy].check_search(cfg, table, source)
    return cfg


def _resources(value: Any, source: str, where: str) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise error(source, where, "must be a table such as { cpu = 1, gpu = 0.25 }")
    resources = asdict(read_table(Resources, value, source, where))
    for key, amount in resources.items():
        at_least(amount, 0, source, f"{where}.{key}")
    if resources["gpu"] > 1 and resources["gpu"] != int(resources["gpu"]):
        raise error(source, f"{where}.gpu", f"fractions are allowed only below 1, got {resources['gpu']}")
    return resources


def _run(table: Any, source: str) -> RunConfig:
    cfg = read_table(RunConfig, table, source, "run")
    if cfg.if_exists not in IF_EXISTS:
        raise error(source, "run.if_exists", f"must be 'error' or 'overwrite', got {cfg.if_exists!r}")
    return cfg


def _promotion(table: Any, source: str) -> PromotionConfig:
    cfg = read_table(PromotionConfig, table, source, "promotion", given={"settings": {}}, extra_keys=STAGE_SETTINGS)
    at_least(cfg.top_k, 1, source, "promotion.top_k")
    for stage in cfg.stages:
        if not isinstance(stage, str) or stage not in STAGE_SETTINGS:
            raise error(source, "promotion.stages", f"unknown stage {stage!r} (known: {', '.join(STAGE_SETTINGS)})")
    cfg.settings = {stage: parse_stage_settings(stage, table.get(stage, {}), source) for stage in STAGE_SETTINGS}
    return cfg
