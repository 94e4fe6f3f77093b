"""A network as plain arrays and back: how a model built once on the driver reaches Ray workers
(through the object store: the arrays are read there without a copy)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from pctune.models.spec import ModelSpec
from pctune.pc.network import PredictiveNet


def state_arrays(net: PredictiveNet) -> dict[str, np.ndarray]:
    """The network's state dict as numpy arrays (zero-copy reads from the object store)."""
    return {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}


def model_from_state(spec: ModelSpec, state: dict[str, np.ndarray] | None = None) -> PredictiveNet:
    """The network of ``spec`` (its backbone built without downloading anything) holding ``state``."""
    from pctune.models.backbones import build_backbone
    from pctune.models.registry import build_from_spec

    net = build_from_spec(spec, build_backbone(spec.backbone, False, None, **spec.backbone_kwargs))
    if state is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only numpy arrays from the object store
            net.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    return net.eval()
