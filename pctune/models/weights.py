"""Feedback (decoder) weights: pctune checkpoints and the published Predify checkpoints."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pctune.errors import PctuneError
from pctune.models.backbones import load_checkpoint
from pctune.pc.network import PredictiveNet
from pctune.utils import atomic_torch_save, first_line

FORMAT = "pctune-feedback-v1"
#: weights named by MLflow rather than by a path (resolved by :mod:`pctune.tracking.weights`)
URI_SCHEMES = ("models:/", "runs:/")


def is_weights_uri(value: object) -> bool:
    """``value`` names weights in MLflow (``models:/...``, ``runs:/...``) rather than a file."""
    return isinstance(value, str) and value.startswith(URI_SCHEMES)


def save_feedback_weights(net: PredictiveNet, path: str | Path, **extra: Any) -> None:
    """Save the decoders as a pctune feedback checkpoint (atomically: a crash leaves the old file)."""
    atomic_torch_save(feedback_payload(net, **extra), path)


def feedback_payload(net: PredictiveNet, **extra: Any) -> dict[str, Any]:
    """The decoders in pctune's feedback checkpoint format (``extra``: more entries, e.g. history)."""
    return {"format": FORMAT, "model": net.name, "encoder_modules": net.encoder_modules,
            "decoders": net.decoders.state_dict(), **extra}


def load_feedback_weights(net: PredictiveNet, source: str | Path | Sequence[str | Path] | Mapping) -> None:
    """Load decoder weights from

    - a pctune checkpoint (``save_feedback_weights``) or a state dict of ``net.decoders``;
    - Predify's published per-pcoder files, given as a list (one file per pcoder, in order) or as a
      directory holding ``*pc{n}_pmodule.pth`` files (PVGG16: the predictor's state dict; PEfficientNetB0:
      a dict whose ``pcoderweights`` entry has ``pmodule.``-prefixed keys).
    """
    if isinstance(source, Mapping):
        _load_decoders(net, source, "<state dict>")
    elif isinstance(source, str | Path) and Path(source).is_dir():
        _load_per_pcoder(net, _predify_files(net, Path(source)))
    elif isinstance(source, str | Path):
        obj = load_checkpoint(source)
        if isinstance(obj, Mapping) and "decoders" in obj:
            obj = obj["decoders"]
        _load_decoders(net, obj, str(source))
    else:
        _load_per_pcoder(net, [Path(p) for p in source])


def _load_decoders(net: PredictiveNet, state: Any, where: str) -> None:
    if not isinstance(state, Mapping):
        raise PctuneError(f"{where}: not a feedback checkpoint")
    state = {k[len("decoders."):] if k.startswith("decoders.") else k: v for k, v in state.items()}
    try:
        net.decoders.load_state_dict(state)
    except RuntimeError as exc:
        raise PctuneError(f"{where}: does not match {net.name}'s decoders: {first_line(exc)}") from exc


def _predify_files(net: PredictiveNet, folder: Path) -> list[Path]:
    files = []
    for n in range(1, net.num_pcoders + 1):
        pattern = re.compile(rf"(^|[^0-9])pc(oder)?{n}([^0-9]|$)")
        found = sorted(p for p in folder.iterdir() if p.suffix in (".pth", ".pt") and pattern.search(p.name))
        if len(found) != 1:
            what = "no file" if not found else f"{len(found)} files"
            raise PctuneError(f"{folder}: {what} for pcoder{n} (expected one *pc{n}_pmodule.pth)")
        files.append(found[0])
    return files


def _load_per_pcoder(net: PredictiveNet, files: Sequence[Path]) -> None:
    if len(files) != net.num_pcoders:
        raise PctuneError(f"{net.name} has {net.num_pcoders} pcoders but {len(files)} feedback files were given")
    for n, path in enumerate(files, start=1):
        state = load_checkpoint(path)
        if isinstance(state, Mapping) and "pcoderweights" in state:
            state = {k[len("pmodule."):]: v for k, v in state["pcoderweights"].items() if k.startswith("pmodule.")}
        if not isinstance(state, Mapping):
            raise PctuneError(f"{path}: not a state dict")
        try:
            net.decoders[n - 1].load_state_dict(state)
        except RuntimeError as exc:
            raise PctuneError(f"{path}: does not match pcoder{n}'s decoder: {first_line(exc)}") from exc
