"""The promotion stages' settings, typed: ``[promotion.noise]``, ``[promotion.imagenet-c]``,
``[promotion.adversarial]`` and ``[promotion.explain]`` of a job, and ``pctune evaluate STAGE --set KEY=VALUE``.

Each stage's keys and defaults are its dataclass's fields; :data:`STAGE_SETTINGS` is the one table of
stage names (job validation, ``pctune evaluate`` and ``pctune promote --stages`` derive from it), and
:data:`ATTACKS` the one table of attack names. :func:`parse_stage_settings` reads and checks a stage's
table when the job is loaded. Plain data: importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pctune.errors import PctuneError
from pctune.schema import at_least, error, read_table

#: the ways a gradient attack differentiates the unrolled network (``hsj`` runs in mode ``decision``)
GRADIENT_MODES = ("exact", "constant-error", "transfer")

#: attack name -> what it is (distances in pixel units, images in [0, 1])
ATTACKS = {
    "bim": "targeted L-inf Basic Iterative Method, gradient-based, random start (paper: 100 steps)",
    "pgd": "targeted L2 projected gradient descent, gradient-based, random start",
    "hsj": "targeted HopSkipJump, decision-based (no gradients), started from images in the target class",
}


@dataclass
class AttackSpec:
    """One attack and its epsilon grid (distances in pixel units, images in [0, 1])."""

    name: str  # a key of ATTACKS: bim | pgd | hsj
    epsilons: list[float]
    steps: int
    rel_stepsize: float | None = None
    modes: list[str] = field(default_factory=lambda: list(GRADIENT_MODES))
    max_images: int | None = None  # hsj: the paper used 100

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise PctuneError(f"unknown attack {self.name!r} (known: {', '.join(ATTACKS)})")
        if not self.epsilons or any(e <= 0 for e in self.epsilons):
            raise PctuneError(f"{self.name}: epsilons must be a non-empty list of positive numbers")
        if self.steps < 1:
            raise PctuneError(f"{self.name}: steps must be >= 1, got {self.steps}")
        if self.max_images is not None and self.max_images < 1:
            raise PctuneError(f"{self.name}: max_images must be >= 1, got {self.max_images}")
        if self.name == "hsj":
            self.modes = ["decision"]
        else:
            bad = [m for m in self.modes if m not in GRADIENT_MODES]
            if bad:
                raise PctuneError(f"{self.name}: unknown gradient mode {bad[0]!r} (one of {', '.join(GRADIENT_MODES)})")


def default_attacks() -> list[AttackSpec]:
    """The paper's protocol, with epsilon grids for 224x224 ImageNet images."""
    return [
        AttackSpec("bim", [0.0005, 0.001, 0.002, 0.004], steps=100, rel_stepsize=2.5 / 100),
        AttackSpec("pgd", [0.05, 0.1, 0.25, 0.5], steps=50, rel_stepsize=2.5 / 50),
        AttackSpec("hsj", [0.5, 1.0, 2.0, 4.0], steps=16, max_images=100),
    ]


@dataclass
class NoiseSettings:
    """``noise``: accuracy and denoising per Gaussian noise level (the paper's Fig. 2)."""

    timesteps: int = 10
    sigmas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    seed: int = 0
    num_images: int | None = None  # None: all clean images


@dataclass
class ImagenetCSettings:
    """``imagenet-c``: CE and mCE at every timestep, on corruptions generated from the clean images or on
    the released ImageNet-C folder."""

    source: str = "generated"  # or "released"
    path: str | None = None  # the released ImageNet-C folder (required when source = "released")
    clean: str | None = None  # the clean images (default: the job's data)
    corruptions: list[str] | None = None  # None: the 15 standard corruptions and the 4 extra ones
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    timesteps: int = 10
    num_images: int | None = None  # generated: clean images corrupted (None: all)
    seed: int = 0
    batch_size: int = 100
    workers: int = 0
    use_ray: bool = True
    resamples: int = 1000  # bootstrap resamples of the mCE interval


@dataclass
class AdversarialSettings:
    """``adversarial``: targeted attacks on the network unrolled to every timestep."""

    timesteps: int = 10
    num_images: int = 1000
    seed: int = 0
    chunk: int = 50  # images per shard
    use_ray: bool = True
    resamples: int = 1000  # bootstrap resamples of the success-rate interval
    attacks: list[AttackSpec] | None = None  # None: default_attacks()


CAM_GRAD_MODES = ("exact", "constant-error")


@dataclass
class ExplainSettings:
    """``explain``: Grad-CAM at every timestep against object masks, by IoU (Choksi et al., ESANN 2025)."""

    timesteps: int = 10
    sigmas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5])  # Gaussian noise, normalized space
    num_images: int | None = None  # None: all clean images (the paper: 2000)
    seed: int = 0
    masks: str | None = None  # the ImageNet-S mask folder (required unless the data is "digits")
    categories: str | None = None  # ImageNet-S categories file (wnid per line); None: every labelled pixel
    mask_resize: bool = False  # a mask whose size differs from its image's: resize it (false: an error)
    ink_threshold: float = 0.5  # digits: the object is the ink, pixels above this in [0, 1]
    cam_threshold: float = 0.5  # the CAM's region: min-max normalised CAM >= this
    grad_mode: str = "exact"  # how the unrolled network is differentiated (as the adversarial stage)
    chunk: int = 50  # images per shard
    use_ray: bool = True
    resamples: int = 1000  # paired bootstrap resamples
    overlays: int = 4  # seeded images in the overlay grid


#: stage name -> its settings; THE table of promotion stages, in their documented order
STAGE_SETTINGS: dict[str, type] = {
    "imagenet-c": ImagenetCSettings,
    "adversarial": AdversarialSettings,
    "noise": NoiseSettings,
    "explain": ExplainSettings,
}

IMAGENET_C_SOURCES = ("generated", "released")


StageSettings = NoiseSettings | ImagenetCSettings | AdversarialSettings | ExplainSettings


def parse_stage_settings(stage: str, table: Mapping[str, Any], where: str, *,
                         name: str | None = None) -> StageSettings:
    """The settings of ``stage`` read from ``table`` and checked (types and ranges).

    ``where`` names the origin in errors (the job file, or ``--set``); ``name`` the table
    (default ``promotion.STAGE``), as in ``jobs/demo.toml: [promotion.noise]: unknown key 'sigmass'``.
    """
    if stage not in STAGE_SETTINGS:
        raise PctuneError(f"{where}: unknown stage {stage!r} (known: {', '.join(STAGE_SETTINGS)})")
    name = name or f"promotion.{stage}"
    settings = read_table(STAGE_SETTINGS[stage], table, where, name)
    _CHECKS[stage](settings, where, name)
    return settings


def _check_noise(s: NoiseSettings, source: str, where: str) -> None:
    at_least(s.timesteps, 1, source, f"{where}.timesteps")
    at_least(s.num_images, 1, source, f"{where}.num_images")
    if not s.sigmas:
        raise error(source, f"{where}.sigmas", "must list at least one noise level")
    for i, sigma in enumerate(s.sigmas, start=1):
        at_least(sigma, 0, source, f"{where}.sigmas[{i}]")


def _check_imagenet_c(s: ImagenetCSettings, source: str, where: str) -> None:
    if s.source not in IMAGENET_C_SOURCES:
        raise error(source, f"{where}.source", f"unknown source {s.source!r} ({', '.join(IMAGENET_C_SOURCES)})")
    if s.source == "released" and not s.path:
        raise error(source, f"{where}.path", "the released ImageNet-C folder is required (source = \"released\")")
    if s.corruptions is not None and not s.corruptions:
        raise error(source, f"{where}.corruptions", "must list at least one corruption (or leave it out: all 19)")
    if not s.severities:
        raise error(source, f"{where}.severities", "must list at least one severity (1..5)")
    for i, severity in enumerate(s.severities, start=1):
        if not 1 <= severity <= 5:
            raise error(source, f"{where}.severities[{i}]", f"must be in 1..5, got {severity}")
    at_least(s.timesteps, 1, source, f"{where}.timesteps")
    at_least(s.num_images, 1, source, f"{where}.num_images")
    at_least(s.batch_size, 1, source, f"{where}.batch_size")
    at_least(s.workers, 0, source, f"{where}.workers")
    at_least(s.resamples, 1, source, f"{where}.resamples")


def _check_adversarial(s: AdversarialSettings, source: str, where: str) -> None:
    at_least(s.timesteps, 1, source, f"{where}.timesteps")
    at_least(s.num_images, 1, source, f"{where}.num_images")
    at_least(s.chunk, 1, source, f"{where}.chunk")
    at_least(s.resamples, 1, source, f"{where}.resamples")
    if s.attacks is not None:
        if not s.attacks:
            raise error(source, f"{where}.attacks", "must list at least one attack (or leave it out: the paper's)")
        names = [a.name for a in s.attacks]
        for i, attack in enumerate(names, start=1):
            if attack in names[:i - 1]:
                raise error(source, f"{where}.attacks[{i}]", f"attack {attack!r} is listed twice")


def check_explain(s: ExplainSettings, source: str, where: str) -> None:
    """The explain stage's ranges (also the cam_iou objective's, whose [objective.cam] overrides them)."""
    _check_noise(s, source, where)
    for key in ("ink_threshold", "cam_threshold"):
        if not 0 <= getattr(s, key) <= 1:
            raise error(source, f"{where}.{key}", f"must be in [0, 1], got {getattr(s, key)}")
    if s.grad_mode not in CAM_GRAD_MODES:
        raise error(source, f"{where}.grad_mode", f"unknown mode {s.grad_mode!r} ({', '.join(CAM_GRAD_MODES)})")
    at_least(s.chunk, 1, source, f"{where}.chunk")
    at_least(s.resamples, 1, source, f"{where}.resamples")
    at_least(s.overlays, 0, source, f"{where}.overlays")


_CHECKS = {"imagenet-c": _check_imagenet_c, "adversarial": _check_adversarial, "noise": _check_noise,
           "explain": check_explain}
