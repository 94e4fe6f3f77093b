"""The model zoo: ``create_model`` builds a ``PredictiveNet`` from a registered spec or a spec file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pctune.data.classes import ModelClasses, resolve_classes
from pctune.errors import PctuneError
from pctune.models.backbones import build_backbone
from pctune.models.layers import build_decoder, default_decoder
from pctune.models.predify_config import spec_from_predify
from pctune.models.spec import ModelSpec, read_toml, spec_from_mapping
from pctune.models.weights import load_feedback_weights
from pctune.pc.network import PredictiveNet
from pctune.pc.split import split_backbone

SPEC_DIR = Path(__file__).parent / "specs"

FeedbackSource = str | Path | Sequence[str | Path] | Mapping


def list_models() -> list[str]:
    """The names ``create_model`` accepts (besides spec file paths)."""
    return sorted(p.stem for p in SPEC_DIR.glob("*.toml"))


def get_spec(name: str | Path) -> ModelSpec:
    """The spec of a registered model, or of a pctune/Predify TOML file given by path."""
    path = Path(name)
    if path.suffix == ".toml" or path.is_file():
        return load_spec(path)
    candidate = SPEC_DIR / f"{name}.toml"
    if not candidate.is_file():
        raise PctuneError(f"unknown model {str(name)!r}; known models: {', '.join(list_models())}")
    return load_spec(candidate)


@torch.no_grad()
def output_classes(net: PredictiveNet) -> int:
    """How many classes ``net`` predicts: the width of its output on one blank input."""
    device = next(net.parameters()).device
    return int(net(torch.zeros(1, *net.input_size, device=device)).shape[-1])


def model_classes(net: PredictiveNet, count: bool = True) -> ModelClasses:
    """What ``net`` predicts, for labelling a class folder (:func:`pctune.data.classes.map_classes`): its
    declared class list and (``count``) its number of outputs, which must agree with the list."""
    outputs = output_classes(net) if count else None
    names = getattr(net, "classes", None)
    if names is not None and outputs is not None and outputs != len(names):
        raise PctuneError(f"{net.name} declares {len(names)} classes but predicts {outputs}")
    return ModelClasses(names, outputs, net.name)


def load_spec(path: str | Path) -> ModelSpec:
    """Read a pctune model spec; a file in Predify's format is converted (see ``predify_config``)."""
    data = read_toml(path)
    if _is_predify(data):
        return spec_from_predify(data, source=str(path))
    return spec_from_mapping(data, source=str(path))


def _is_predify(data: dict) -> bool:
    """Predify's format: no ``backbone`` key (pctune's own specs always name theirs), or pcoder tables
    with Predify's ``predictor`` / ``hyperparameters`` keys (a Predify config that names its backbone)."""
    pcoders = data.get("pcoders")
    if not isinstance(pcoders, list):
        return False
    return "backbone" not in data or any(isinstance(t, dict) and {"predictor", "hyperparameters"} & set(t)
                                         for t in pcoders)


def create_model(
    name: str | Path,
    pretrained: bool = False,
    feedback_weights: FeedbackSource | None = None,
    gradient_scaling: bool | None = None,
    *,
    backbone_weights: str | Path | None = None,
    backbone: str | None = None,
    **kwargs: Any,
) -> PredictiveNet:
    """Build a predictive network.

    Args:
        name: a registered model (``pctune.list_models()``) or the path of a pctune/Predify TOML spec.
        pretrained: load the backbone's ImageNet weights from torchvision/timm (or their cache).
        feedback_weights: decoder weights (see :func:`pctune.models.weights.load_feedback_weights`).
        gradient_scaling: override the spec's gradient-scaling switch.
        backbone_weights: a local state dict for the backbone (instead of downloading).
        backbone: the backbone of a Predify configuration that does not name one (e.g.
            ``"torchvision/vgg16"``), or a replacement for the spec's.
        **kwargs: passed to the backbone's constructor (e.g. ``num_classes``).
    """
    spec = get_spec(name)
    if backbone:
        spec.backbone = backbone
    if not spec.backbone:
        raise PctuneError(f"{spec.source}: the configuration names no backbone: add backbone = \"torchvision/vgg16\" "
                          "(for example) to it, or give one (create_model(..., backbone=...), a job's model.backbone)")
    net = build_backbone(spec.backbone, pretrained, backbone_weights, **{**spec.backbone_kwargs, **kwargs})
    return build_from_spec(spec, net, feedback_weights=feedback_weights, gradient_scaling=gradient_scaling)


def from_predify_config(
    path: str | Path,
    backbone: nn.Module | str,
    pretrained: bool = False,
    feedback_weights: FeedbackSource | None = None,
    gradient_scaling: bool | None = None,
    **kwargs: Any,
) -> PredictiveNet:
    """Build a ``PredictiveNet`` from a configuration file in Predify's format around ``backbone`` (an
    ``nn.Module`` or a torchvision/timm model name)."""
    from pctune.models.predify_config import spec_from_predify
    from pctune.models.spec import read_toml

    spec = spec_from_predify(read_toml(path), source=str(path))
    if isinstance(backbone, str):
        spec.backbone = backbone
        backbone = build_backbone(backbone, pretrained, **kwargs)
    _alias_legacy_modules(spec, backbone)
    return build_from_spec(spec, backbone, feedback_weights=feedback_weights, gradient_scaling=gradient_scaling)


def _alias_legacy_modules(spec: ModelSpec, backbone: nn.Module) -> None:
    """Older timm named EfficientNet's stem activation ``act1``; current timm folds it into ``bn1``."""
    names = dict(backbone.named_modules())
    for pcoder in spec.pcoders:
        if pcoder.module == "act1" and "act1" not in names and "bn1" in names:
            pcoder.module = "bn1"


def build_from_spec(
    spec: ModelSpec,
    backbone: nn.Module,
    feedback_weights: FeedbackSource | None = None,
    gradient_scaling: bool | None = None,
) -> PredictiveNet:
    """Attach the spec's decoders (Predify's default rule where none is declared) to ``backbone``."""
    modules = [p.module for p in spec.pcoders]
    shapes = _encoder_shapes(backbone, modules, spec.input_size) if any(
        p.decoder is None for p in spec.pcoders) else None
    decoders = []
    for i, pcoder in enumerate(spec.pcoders):
        layers = pcoder.decoder if pcoder.decoder is not None else default_decoder(shapes[i], shapes[i + 1])
        decoders.append(build_decoder(layers, f"{spec.name}: pcoder{i + 1}.decoder"))
    net = PredictiveNet(
        backbone,
        modules,
        decoders,
        name=spec.name,
        input_size=spec.input_size,
        gradient_scaling=spec.gradient_scaling if gradient_scaling is None else gradient_scaling,
        presets=spec.presets,
        cam_layer=spec.cam_layer,
    )
    net.classes = resolve_classes(spec.classes)  # output i predicts classes[i] (None: not declared)
    if feedback_weights is not None:
        load_feedback_weights(net, feedback_weights)
    return net


@torch.no_grad()
def _encoder_shapes(backbone: nn.Module, modules: list[str], input_size: Sequence[int]) -> list[tuple]:
    """(C, H, W) of the image and of every encoder's output at ``input_size``."""
    encoders, _ = split_backbone(backbone, modules)
    was_training = backbone.training
    backbone.eval()
    x = torch.zeros(1, *input_size)
    shapes = [tuple(x.shape[1:])]
    for encoder in encoders:
        x = encoder(x)
        shapes.append(tuple(x.shape[1:]))
    backbone.train(was_training)
    return shapes
