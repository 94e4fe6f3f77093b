"""Model specs: a network declared as data (which backbone, which modules end each encoder, which
decoder predicts it, the hyperparameter presets), read from pctune's TOML format."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pctune.errors import PctuneError
from pctune.models.layers import build_decoder
from pctune.pc.hyperparameters import Hyperparameters


@dataclass
class PcoderSpec:
    module: str  # the backbone module whose output ends this encoder
    decoder: Any = None  # a layer table, a list of them, or None for Predify's default rule


@dataclass
class ModelSpec:
    name: str
    backbone: str  # "torchvision/vgg16", "timm/efficientnet_b0", "pctune/demo_cnn", ...
    pcoders: list[PcoderSpec]
    input_size: tuple[int, int, int] = (3, 224, 224)
    gradient_scaling: bool = False
    description: str = ""
    presets: dict[str, Hyperparameters] = field(default_factory=dict)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    cam_layer: str | None = None  # the pcoder module Grad-CAM explains (None: the last pcoder's)
    # the classes it predicts, in output order: "imagenet-1k" or a list of names (None: not declared;
    # class folders are then taken in sorted order), see pctune.data.classes
    classes: str | list[str] | None = None

    @property
    def num_pcoders(self) -> int:
        return len(self.pcoders)


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PctuneError(f"{path}: no such file")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise PctuneError(f"{path}: invalid TOML: {exc}") from exc


def spec_from_mapping(data: Mapping[str, Any], source: str = "<mapping>") -> ModelSpec:
    where = source
    for key in ("name", "backbone", "pcoders"):
        if key not in data:
            raise PctuneError(f"{where}: missing required key {key!r}")
    known = {"name", "backbone", "pcoders", "input_size", "gradient_scaling", "description",
             "hyperparameters", "backbone_kwargs", "cam_layer", "classes"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PctuneError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    pcoders = []
    for i, table in enumerate(data["pcoders"], start=1):
        if "module" not in table:
            raise PctuneError(f"{where}: pcoder{i}: missing 'module'")
        decoder = table.get("decoder")
        if decoder is not None:
            build_decoder(decoder, f"{where}: pcoder{i}.decoder")  # validate early
        pcoders.append(PcoderSpec(module=str(table["module"]), decoder=decoder))
    spec = ModelSpec(
        name=str(data["name"]),
        backbone=str(data["backbone"]),
        pcoders=pcoders,
        input_size=parse_input_size(data.get("input_size", (3, 224, 224)), where),
        gradient_scaling=bool(data.get("gradient_scaling", False)),
        description=str(data.get("description", "")),
        backbone_kwargs=dict(data.get("backbone_kwargs", {})),
        source=source,
        cam_layer=_cam_layer(data.get("cam_layer"), pcoders, where),
        classes=parse_classes(data.get("classes"), where),
    )
    presets = data.get("hyperparameters", {})
    if not isinstance(presets, Mapping) or not all(isinstance(t, Mapping) for t in presets.values()):
        raise PctuneError(f"{where}: hyperparameters must be tables of presets ([hyperparameters.NAME] with beta, "
                          f"lambda and alpha), got {_kind(presets)}")
    for preset, table in presets.items():
        try:
            spec.presets[preset] = Hyperparameters.from_mapping(table, spec.num_pcoders).for_pcoders(
                spec.num_pcoders)
        except PctuneError as exc:
            raise PctuneError(f"{where}: hyperparameters.{preset}: {exc}") from exc
    return spec


def _cam_layer(value: Any, pcoders: list[PcoderSpec], where: str) -> str | None:
    """Grad-CAM needs the representation the dynamics update, so the layer must end a pcoder."""
    modules = [p.module for p in pcoders]
    if value is not None and value not in modules:
        raise PctuneError(f"{where}: cam_layer {value!r} must be one of the pcoder modules ({', '.join(modules)})")
    return None if value is None else str(value)


def _kind(value: Any) -> str:
    return "a table of non-tables" if isinstance(value, Mapping) else f"a {type(value).__name__}"


def parse_classes(value: Any, where: str) -> str | list[str] | None:
    """A spec's ``classes``: the name of a known class list or a non-empty list of distinct names."""
    from pctune.data.classes import NAMED_CLASS_LISTS

    if value is None:
        return None
    if isinstance(value, str):
        if value not in NAMED_CLASS_LISTS:
            raise PctuneError(f"{where}: classes: unknown class list {value!r} (known: {', '.join(NAMED_CLASS_LISTS)}, "
                              "or a list of class names)")
        return value
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise PctuneError(f"{where}: classes must be {' or '.join(map(repr, NAMED_CLASS_LISTS))} or a non-empty "
                          "list of class names")
    repeated = sorted({v for v in value if value.count(v) > 1})
    if repeated:
        raise PctuneError(f"{where}: classes: {repeated[0]!r} is listed twice")
    return list(value)


def parse_input_size(value: Any, where: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise PctuneError(f"{where}: input_size must be [channels, height, width], got {value!r}") from exc
    return c, h, w
