"""Decoder layers declared as data: ``{type = "ConvTranspose2d", in_channels = 64, ...}`` tables.

Only a fixed set of layer types can be named, and only literal arguments are accepted; nothing in a
model file is ever executed.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from pctune.errors import PctuneError

LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Sequential": nn.Sequential,
    "ConvTranspose2d": nn.ConvTranspose2d,
    "Conv2d": nn.Conv2d,
    "Upsample": nn.Upsample,
    "ReLU": nn.ReLU,
    "SiLU": nn.SiLU,
}

LayerSpec = Mapping[str, Any]

#: The largest decoder layer a spec may ask for, in parameters (VGG16's largest layer has ~103 M; a
#: layer past this is a typo, and building it would exhaust memory instead of saying so).
MAX_LAYER_PARAMETERS = 2_000_000_000


def normalize_layer(type_name: str, args: Sequence[Any], kwargs: Mapping[str, Any], where: str) -> dict:
    """Bind positional and keyword arguments to the layer's signature, as one keyword table."""
    if type_name not in LAYER_TYPES or type_name == "Sequential":
        allowed = ", ".join(k for k in LAYER_TYPES if k != "Sequential")
        raise PctuneError(f"{where}: unknown decoder layer {type_name!r} (allowed: Sequential, {allowed})")
    try:
        bound = inspect.signature(LAYER_TYPES[type_name]).bind(*args, **kwargs)
    except TypeError as exc:
        raise PctuneError(f"{where}: bad arguments for {type_name}: {exc}") from exc
    table = {"type": type_name}
    for key, value in bound.arguments.items():
        table[key] = list(value) if isinstance(value, tuple) else value
    return table


def build_decoder(spec: LayerSpec | Sequence[LayerSpec], where: str = "decoder") -> nn.Module:
    """A single table builds that layer; a list of tables builds an ``nn.Sequential``."""
    if isinstance(spec, Mapping):
        return _build_layer(spec, where)
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return nn.Sequential(*(_build_layer(item, f"{where}[{i}]") for i, item in enumerate(spec)))
    raise PctuneError(f"{where}: a decoder is a layer table or a list of layer tables, got {spec!r}")


def _build_layer(spec: LayerSpec, where: str) -> nn.Module:
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise PctuneError(f"{where}: a layer table needs a 'type' key, got {spec!r}")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k != "type"}
    table = normalize_layer(str(spec["type"]), (), kwargs, where)
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in table.items() if k != "type"}
    _check_size(table["type"], kwargs, where)
    try:
        return LAYER_TYPES[table["type"]](**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise PctuneError(f"{where}: cannot build {table['type']}: {exc}") from exc


def _check_size(type_name: str, kwargs: Mapping[str, Any], where: str) -> None:
    """Refuse a convolution whose weights would exceed :data:`MAX_LAYER_PARAMETERS`, before allocating."""
    if type_name not in ("Conv2d", "ConvTranspose2d"):
        return
    try:
        size = kwargs["kernel_size"]
        kernel = size[0] * size[1] if isinstance(size, tuple | list) else size * size
        count = int(kwargs["in_channels"]) * int(kwargs["out_channels"]) * int(kernel)
    except (KeyError, TypeError, ValueError, IndexError):
        return  # the layer's own constructor says what is wrong
    if count > MAX_LAYER_PARAMETERS:
        raise PctuneError(f"{where}: {type_name} would have {count:.3g} parameters (at most "
                          f"{MAX_LAYER_PARAMETERS:.3g}): check in_channels, out_channels and kernel_size")


def default_decoder(in_shape: Sequence[int], out_shape: Sequence[int]) -> list[dict]:
    """Predify's default decoder for an encoder mapping ``in_shape`` (C, H, W) to ``out_shape``:
    bilinear upsampling by the spatial shrink factor (when > 1), then a 3x3 transposed convolution
    from the encoder's output channels to its input channels."""
    c_in, h_in, w_in = in_shape
    c_out, h_out, w_out = out_shape
    layers: list[dict] = []
    factor = (h_in / h_out, w_in / w_out)
    if factor != (1.0, 1.0):
        layers.append({"type": "Upsample", "scale_factor": list(factor), "mode": "bilinear"})
    layers.append({"type": "ConvTranspose2d", "in_channels": c_out, "out_channels": c_in,
                   "kernel_size": 3, "stride": 1, "padding": 1})
    return layers
