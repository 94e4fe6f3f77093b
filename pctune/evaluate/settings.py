"""PROVISIONAL (replaced by the jobs branch): typed stage settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class NoiseSettings:
    timesteps: int = 10
    sigmas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    seed: int = 0
    num_images: int | None = None


@dataclass
class ImagenetCSettings:
    source: str = "generated"
    path: str | None = None
    clean: str | None = None
    corruptions: list[str] | None = None
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    timesteps: int = 10
    num_images: int | None = None
    seed: int = 0
    batch_size: int = 100
    workers: int = 0
    use_ray: bool = True
    resamples: int = 1000


@dataclass
class AdversarialSettings:
    timesteps: int = 10
    num_images: int = 1000
    seed: int = 0
    chunk: int = 50
    use_ray: bool = True
    resamples: int = 1000
    attacks: list[Any] | None = None


STAGE_SETTINGS = {"imagenet-c": ImagenetCSettings, "adversarial": AdversarialSettings, "noise": NoiseSettings}


def parse_stage_settings(stage: str, table, where: str = "<settings>"):
    cls = STAGE_SETTINGS[stage]
    table = dict(table)
    if stage == "adversarial" and table.get("attacks"):
        from pctune.evaluate.adversarial import AttackSpec

        table["attacks"] = [AttackSpec(**a) for a in table["attacks"]]
    return cls(**table)
