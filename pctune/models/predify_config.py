"""Import Predify's configuration format (``[[pcoders]]`` with ``module``, ``predictor``,
``hyperparameters = {feedforward, feedback, pc}``, ``gradient_scaling``, ``input_size``).

Predify writes its predictors as Python expressions, e.g.
``"Sequential(ConvTranspose2d(128, 64, kernel_size=(10, 10), stride=(2, 2)), ReLU(inplace=True))"``.
They are parsed with ``ast`` into pctune's layer tables: only calls of the allowed layer types with
literal arguments are accepted, and nothing is evaluated or executed.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any

from pctune.errors import PctuneError
from pctune.models.layers import LAYER_TYPES, normalize_layer
from pctune.models.spec import ModelSpec, PcoderSpec, parse_input_size
from pctune.pc.hyperparameters import Hyperparameters

_PREFIXES = ("torch.nn.", "nn.")

#: the top-level keys of a Predify configuration (``backbone``: pctune's addition, when it names none)
PREDIFY_KEYS = ("backbone", "gradient_scaling", "imports", "input_size", "name", "pcoders", "shared_hyperparameters")


def module_path(name: str) -> str:
    """Predify's ``"features [3]"`` / ``"blocks[0]"`` notation as a dotted module path."""
    compact = re.sub(r"\s+", "", name)
    return re.sub(r"\[(\d+)\]", r".\1", compact).strip(".")


def parse_predictor(expression: str, where: str = "predictor") -> dict | list[dict]:
    """A Predify predictor expression as a layer table (or a list of them for ``Sequential``)."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise PctuneError(f"{where}: not a valid expression: {exc.msg}") from exc
    return _layer(tree.body, where, top=True)


def _call_name(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    name = ".".join(reversed(parts))
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _layer(node: ast.expr, where: str, top: bool = False) -> dict | list[dict]:
    if not isinstance(node, ast.Call):
        raise PctuneError(f"{where}: expected a layer call such as ConvTranspose2d(...), got "
                          f"{ast.unparse(node)!r}")
    name = _call_name(node.func)
    if name not in LAYER_TYPES:
        raise PctuneError(f"{where}: {name or ast.unparse(node.func)!r} is not an allowed layer "
                          f"(allowed: {', '.join(LAYER_TYPES)})")
    if name == "Sequential":
        if not top:
            raise PctuneError(f"{where}: nested Sequential is not supported")
        if node.keywords:
            raise PctuneError(f"{where}: Sequential takes layers only")
        return [_layer(arg, f"{where}[{i}]") for i, arg in enumerate(node.args)]
    args = [_literal(arg, where) for arg in node.args]
    kwargs = {kw.arg: _literal(kw.value, where) for kw in node.keywords if kw.arg is not None}
    if any(kw.arg is None for kw in node.keywords):
        raise PctuneError(f"{where}: **kwargs are not allowed")
    return normalize_layer(name, args, kwargs, where)


def _literal(node: ast.expr, where: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError as exc:
        raise PctuneError(f"{where}: only literal arguments are allowed, got {ast.unparse(node)!r}") from exc


def spec_from_predify(data: Mapping[str, Any], source: str = "<predify config>",
                      backbone: str = "") -> ModelSpec:
    """Convert a parsed Predify configuration to a :class:`ModelSpec`."""
    unknown = sorted(set(data) - set(PREDIFY_KEYS))
    if unknown:
        raise PctuneError(f"{source}: unknown key {unknown[0]!r} in a Predify configuration "
                          f"(known: {', '.join(PREDIFY_KEYS)})")
    for line in data.get("imports", []):
        _check_import(str(line), source)
    tables = data.get("pcoders")
    if not tables:
        raise PctuneError(f"{source}: no [[pcoders]] tables")
    pcoders, triples = [], []
    for i, table in enumerate(tables, start=1):
        where = f"{source}: pcoder{i}"
        if not isinstance(table, Mapping) or "module" not in table:
            raise PctuneError(f"{where}: expected a [[pcoders]] table with a 'module', got {table!r}")
        decoder = parse_predictor(str(table["predictor"]), f"{where}.predictor") if "predictor" in table else None
        pcoders.append(PcoderSpec(module=module_path(str(table["module"])), decoder=decoder))
        hp = table.get("hyperparameters", {"feedforward": 0.3, "feedback": 0.3, "pc": 0.01})
        if not isinstance(hp, Mapping):
            raise PctuneError(f"{where}.hyperparameters: expected a table such as "
                              f"{{feedforward = 0.3, feedback = 0.3, pc = 0.01}}, got {hp!r}")
        triples.append({"beta": hp.get("feedforward", 0.3), "lambda": hp.get("feedback", 0.3),
                        "alpha": hp.get("pc", 0.01)})
    default = Hyperparameters.from_mapping({f"pcoder{i}": t for i, t in enumerate(triples, start=1)})
    return ModelSpec(
        name=str(data.get("name", "predify-network")),
        backbone=backbone or str(data.get("backbone", "")),
        pcoders=pcoders,
        input_size=parse_input_size(data.get("input_size", (3, 224, 224)), source),
        gradient_scaling=bool(data.get("gradient_scaling", False)),
        description=f"imported from Predify configuration {source}",
        presets={"default": default},
        source=source,
    )


def _check_import(line: str, source: str) -> None:
    """Predify configs list the imports their predictors need; accept only torch.nn layer imports."""
    if re.fullmatch(r"\s*(import torch(\.nn)?( as nn)?|from torch import nn)\s*", line):
        return
    match = re.fullmatch(r"\s*from\s+torch\.nn\s+import\s+([\w\s,]+)", line)
    names = [n.strip() for n in match.group(1).split(",")] if match else []
    if not match or any(n not in LAYER_TYPES for n in names):
        raise PctuneError(f"{source}: unsupported import {line!r} (only 'from torch.nn import "
                          f"{', '.join(LAYER_TYPES)}')")
