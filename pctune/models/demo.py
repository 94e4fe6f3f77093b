"""pctune's own small backbones (used by the embedded demo)."""

from __future__ import annotations

from torch import nn

from pctune.errors import PctuneError


def demo_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    """A small VGG-style CNN: three conv blocks (each ending in a ReLU), global pooling, linear head."""
    w = width
    features = nn.Sequential(
        nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),  # features.1 ends encoder 1
        nn.MaxPool2d(2), nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),  # features.4 ends encoder 2
        nn.MaxPool2d(2), nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),  # features.7 ends encoder 3
    )
    model = nn.Sequential()
    model.add_module("features", features)
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("classifier", nn.Linear(4 * w, num_classes))
    return model


_BACKBONES = {"demo_cnn": demo_cnn}


def build_backbone(name: str, **kwargs) -> nn.Module:
    if name not in _BACKBONES:
        raise PctuneError(f"pctune has no backbone named {name!r} (known: {', '.join(_BACKBONES)})")
    return _BACKBONES[name](**kwargs)
