"""Feedforward backbones: torchvision and timm models by name, pctune's own small demo network, and
weights from the model hubs or from a local file."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pctune.errors import PctuneError
from pctune.utils import first_line


def build_backbone(ref: str, pretrained: bool = False, weights_path: str | Path | None = None,
                   **kwargs: Any) -> nn.Module:
    """Build ``ref`` ("torchvision/vgg16", "timm/efficientnet_b0", "pctune/demo_cnn", or a bare
    torchvision/timm model name). ``pretrained`` downloads the library's ImageNet weights (or takes
    them from the local cache); ``weights_path`` loads a local state dict instead."""
    source, name = _split_ref(ref)
    if source == "torchvision":
        model = _torchvision(name, pretrained and weights_path is None, kwargs)
    elif source == "timm":
        model = _timm(name, pretrained and weights_path is None, kwargs)
    elif source == "pctune":
        from pctune.models.demo import build_backbone as build_demo_backbone

        model = build_demo_backbone(name, **kwargs)
    else:
        raise PctuneError(f"unknown backbone source {source!r} in {ref!r} (torchvision, timm or pctune)")
    if weights_path is not None:
        load_backbone_weights(model, weights_path)
    return model.eval()


def _split_ref(ref: str) -> tuple[str, str]:
    if "/" in ref:
        source, name = ref.split("/", 1)
        return source, name
    import timm
    import torchvision

    if ref in torchvision.models.list_models():
        return "torchvision", ref
    if timm.is_model(ref):
        return "timm", ref
    raise PctuneError(f"unknown backbone {ref!r}: not a torchvision or timm model name")


def _torchvision(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as exc:
        raise PctuneError(f"torchvision has no model named {name!r}") from exc
    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    try:
        return builder(weights=weights, **kwargs)
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise
        raise PctuneError(
            f"could not fetch torchvision's pretrained weights for {name} ({first_line(exc)}); "
            "if this machine is offline, pass a local state dict with backbone_weights=PATH"
        ) from exc


def _timm(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise PctuneError(f"timm has no model named {name!r}")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise
        raise PctuneError(
            f"could not fetch timm's pretrained weights for {name} ({first_line(exc)}); "
            "if this machine is offline, pass a local state dict with backbone_weights=PATH"
        ) from exc


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict saved with ``torch.save(model.state_dict())`` (optionally wrapped in
    ``{"state_dict": ...}`` or ``{"model": ...}``)."""
    state = load_checkpoint(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise PctuneError(f"{path}: does not match the backbone: {first_line(exc)}") from exc


def load_checkpoint(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PctuneError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise PctuneError(f"{path}: cannot be read as a PyTorch checkpoint: {_load_failure(exc)}") from exc


def _load_failure(exc: BaseException) -> str:
    """Why a weights-only load failed, without torch's advice to load the file with weights_only=False
    (that would run whatever code the file holds)."""
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc) or "Weights only" in str(exc):
        return "it holds Python objects besides tensors, which pctune never unpickles (only plain weights load)"
    return first_line(exc)
