"""Cut a feedforward backbone into consecutive encoders and a head, without forward hooks.

The backbone is traced once with ``torch.fx`` (the encoder boundary modules kept whole as leaves) and
its graph is partitioned at the boundary modules' outputs. Each piece is a ``GraphModule`` that calls
the backbone's own submodules, so parameters are shared, names are unchanged, and running the pieces
one after the other computes exactly ``backbone(x)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx
from torch import nn

from pctune.errors import PctuneError


class _BoundaryTracer(fx.Tracer):
    def __init__(self, boundaries: set[str]) -> None:
        super().__init__()
        self.boundaries = boundaries

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.boundaries or super().is_leaf_module(m, qualname)


def split_backbone(backbone: nn.Module, boundaries: Sequence[str]) -> tuple[list[fx.GraphModule], fx.GraphModule]:
    """Return ``(encoders, head)``: encoder n maps the output of boundary n-1 (the image for n=1) to
    the output of boundary n; the head maps the last boundary's output to the backbone's output."""
    names = dict(backbone.named_modules())
    for name in boundaries:
        if name not in names:
            raise PctuneError(f"the backbone has no module named {name!r}")
    try:
        graph = _BoundaryTracer(set(boundaries)).trace(backbone)
    except Exception as exc:  # fx raises many exception types for untraceable code
        raise PctuneError(f"cannot trace the backbone with torch.fx: {exc}") from exc

    segment_of = _assign_segments(graph, list(boundaries))
    pieces = []
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise PctuneError(f"the backbone's forward must take one input, it takes {len(inputs)}")
    entry = inputs[0]
    for index in range(len(boundaries) + 1):
        pieces.append(_extract(backbone, graph, segment_of, index, entry, boundaries))
        entry = next(n for n in graph.nodes if n.op == "call_module" and n.target == boundaries[index]) \
            if index < len(boundaries) else None
    return pieces[:-1], pieces[-1]


def _assign_segments(graph: fx.Graph, boundaries: list[str]) -> dict[fx.Node, int]:
    segment_of: dict[fx.Node, int] = {}
    segment = 0
    seen: list[str] = []
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            segment_of[node] = 0 if node.op == "placeholder" else len(boundaries)
            continue
        segment_of[node] = segment
        if node.op == "call_module" and node.target in boundaries:
            if node.target in seen:
                raise PctuneError(f"module {node.target!r} is called more than once in the forward pass")
            if node.target != boundaries[segment]:
                raise PctuneError(
                    f"encoder modules must be listed in forward order: {node.target!r} runs before "
                    f"{boundaries[segment]!r}"
                )
            seen.append(node.target)
            segment += 1
    missing = [b for b in boundaries if b not in seen]
    if missing:
        raise PctuneError(f"module {missing[0]!r} is never called in the backbone's forward pass")
    return segment_of


def _extract(root: nn.Module, graph: fx.Graph, segment_of: dict[fx.Node, int], index: int,
             entry: fx.Node, boundaries: Sequence[str]) -> fx.GraphModule:
    """The sub-graph of segment ``index`` as a module of one input (``entry``'s value)."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {entry: new.placeholder("x")}

    def remap(arg: fx.Node) -> fx.Node:
        if arg in env:
            return env[arg]
        if arg.op == "get_attr":  # constants and parameters may be used in any piece
            env[arg] = new.node_copy(arg, remap)
            return env[arg]
        raise PctuneError(
            f"the backbone has a connection that skips over the boundary of encoder {index} "
            f"({arg.name} is used after {boundaries[min(index, len(boundaries)) - 1]!r}); "
            "encoders must follow each other with no gap"
        )

    result = None
    for node in graph.nodes:
        if segment_of[node] != index or node is entry or node.op == "placeholder":
            continue
        if node.op == "output":
            result = fx.map_arg(node.args[0], remap)
            continue
        env[node] = new.node_copy(node, remap)
        if node.op == "call_module" and index < len(boundaries) and node.target == boundaries[index]:
            result = env[node]
    new.output(result)
    module = fx.GraphModule(root, new)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module
