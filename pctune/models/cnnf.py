"""CNN-F networks as TOML data (``pctune/models/cnnf_specs/*.toml`` or a file of the user's):

    name = "cnnf_demo"
    family = "cnnf"
    input_size = [1, 16, 16]
    ind = 1          # feedback reconstructs the input of this block (0: the image)
    res = 0.1        # the residual parameter of the adaptive ReLU and of the input blend
    [[blocks]]
    conv = [1, 16]   # in, out channels (3x3, padding 1 unless kernel / padding say otherwise)
    norm = true      # CNN-F's instance norm after the convolution
    pool = 2         # AdaPool 2x2 after the ReLU
    [[blocks]]
    linear = [256, 10]
    relu = false     # the logits

Every block is checked against the shape that reaches it, so a spec whose channels or sizes do not
chain is one line naming the block, before any training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pctune.errors import PctuneError
from pctune.models.spec import read_toml
from pctune.pc.cnnf import CNNF, Block

SPEC_DIR = Path(__file__).parent / "cnnf_specs"
_SPEC_KEYS = {"name", "family", "description", "input_size", "ind", "res", "blocks"}
_BLOCK_KEYS = {"conv", "linear", "kernel", "padding", "norm", "relu", "pool"}


@dataclass(frozen=True)
class CNNFSpec:
    name: str
    input_size: tuple[int, int, int]
    blocks: tuple[Block, ...]
    ind: int = 0
    res: float = 0.1
    description: str = ""

    @property
    def num_classes(self) -> int:
        return self.blocks[-1].out_features


def list_cnnf_models() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.toml"))


def get_cnnf_spec(name: str | Path) -> CNNFSpec:
    """A registered CNN-F spec by name, or a spec file by path."""
    path = Path(name)
    if path.suffix != ".toml" and not path.is_file():
        path = SPEC_DIR / f"{name}.toml"
        if not path.is_file():
            raise PctuneError(f"unknown CNN-F model {str(name)!r}; known: {', '.join(list_cnnf_models())}")
    return cnnf_spec_from_mapping(read_toml(path), str(path))


def create_cnnf(spec: CNNFSpec | str | Path) -> CNNF:
    spec = spec if isinstance(spec, CNNFSpec) else get_cnnf_spec(spec)
    return CNNF(spec.blocks, ind=spec.ind, res=spec.res, name=spec.name, input_size=spec.input_size)


def cnnf_spec_from_mapping(data: Mapping[str, Any], source: str = "<mapping>") -> CNNFSpec:
    _refuse_unknown(data, _SPEC_KEYS, source)
    if data.get("family", "cnnf") != "cnnf":
        raise PctuneError(f"{source}: family = {data['family']!r}, not 'cnnf'")
    for key in ("name", "input_size", "blocks"):
        if key not in data:
            raise PctuneError(f"{source}: missing required key {key!r}")
    size = data["input_size"]
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
        raise PctuneError(f"{source}: input_size must be [channels, height, width], got {size!r}")
    if not isinstance(data["blocks"], list) or not data["blocks"]:
        raise PctuneError(f"{source}: blocks must be a non-empty list of [[blocks]] tables")
    blocks = tuple(_block(b, f"{source}: blocks[{i}]") for i, b in enumerate(data["blocks"]))
    _check_shapes(blocks, tuple(size), source)
    ind, res = data.get("ind", 0), data.get("res", 0.1)
    if not isinstance(ind, int) or not 0 <= ind < len(blocks):
        raise PctuneError(f"{source}: ind = {ind!r}: a block index, 0..{len(blocks) - 1}")
    if not isinstance(res, int | float) or not 0 <= res <= 1:
        raise PctuneError(f"{source}: res = {res!r}: a number in [0, 1]")
    return CNNFSpec(str(data["name"]), tuple(size), blocks, ind, float(res), str(data.get("description", "")))


def _refuse_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = set(table) - known
    if unknown:
        raise PctuneError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")


def _block(table: Any, where: str) -> Block:
    if not isinstance(table, Mapping):
        raise PctuneError(f"{where}: a table, got {table!r}")
    _refuse_unknown(table, _BLOCK_KEYS, where)
    kinds = [k for k in ("conv", "linear") if k in table]
    if len(kinds) != 1:
        raise PctuneError(f"{where}: exactly one of conv = [in, out] or linear = [in, out]")
    kind = kinds[0]
    features = table[kind]
    if not (isinstance(features, list) and len(features) == 2 and all(isinstance(v, int) and v > 0 for v in features)):
        raise PctuneError(f"{where}: {kind} = [in, out] (two positive integers), got {features!r}")
    if kind == "linear" and (table.get("norm") or table.get("pool")):
        raise PctuneError(f"{where}: norm and pool apply to conv blocks only")
    pool = table.get("pool", 0)
    if not isinstance(pool, int) or pool < 0:
        raise PctuneError(f"{where}: pool = {pool!r}: a window size (0: no pool)")
    return Block(kind, features[0], features[1], kernel=int(table.get("kernel", 3)),
                 padding=int(table.get("padding", 1)), norm=bool(table.get("norm", False)),
                 relu=bool(table.get("relu", True)), pool=pool)


def _check_shapes(blocks: tuple[Block, ...], size: tuple[int, int, int], source: str) -> None:
    """Walk the shape through the blocks: channels must chain and a linear block takes the flattened size."""
    channels, h, w = size
    flat = None  # after the first linear block
    for i, block in enumerate(blocks):
        where = f"{source}: blocks[{i}]"
        if block.kind == "conv":
            if flat is not None:
                raise PctuneError(f"{where}: a conv block after a linear one")
            if block.in_features != channels:
                raise PctuneError(f"{where}: conv takes {block.in_features} channels but receives {channels}")
            h, w = h + 2 * block.padding - block.kernel + 1, w + 2 * block.padding - block.kernel + 1
            if block.pool:
                h, w = h // block.pool, w // block.pool
            if h < 1 or w < 1:
                raise PctuneError(f"{where}: the feature map shrinks to {h}x{w}")
            channels = block.out_features
        else:
            receives = flat if flat is not None else channels * h * w
            if block.in_features != receives:
                raise PctuneError(f"{where}: linear takes {block.in_features} features but receives {receives}")
            flat = block.out_features
