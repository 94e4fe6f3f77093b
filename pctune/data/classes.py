"""Which output of a model each class folder of an ImageNet-style folder (``root/<class>/<image>``) is:
the one rule every command that reads such a folder goes through (search, evaluate, the promotion stages,
train-feedback).

A model that declares its class list (a spec's ``classes``: ``"imagenet-1k"``, the ImageNet-1k wnids in
the standard order, or an explicit list of names) labels a folder by name: ``n02102040/`` is output 217
whichever other folders are there, so a subset of the classes keeps its true indices, and a folder whose
name is not in the list is an error. A model without one keeps the older rule: the class folders, sorted,
are outputs 0, 1, ..., and their count must be the model's. Plain data: importing this does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from pctune.errors import PctuneError

IMAGENET_1K = "imagenet-1k"

#: the named class lists a model spec may declare (``classes = "imagenet-1k"``)
NAMED_CLASS_LISTS = (IMAGENET_1K,)


@cache
def imagenet_1k() -> tuple[str, ...]:
    """The ImageNet-1k wnids in the standard order (output i of an ImageNet classifier), from timm."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_names())


def resolve_classes(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """A declared class list (a name of :data:`NAMED_CLASS_LISTS` or the names themselves) as names."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != IMAGENET_1K:
            raise PctuneError(f"unknown class list {value!r} (known: {', '.join(NAMED_CLASS_LISTS)})")
        return imagenet_1k()
    return tuple(value)


@dataclass(frozen=True)
class ModelClasses:
    """What a model predicts: its class names in output order (None: not declared, class folders are taken
    in sorted order) and its number of outputs (None: not checked)."""

    names: tuple[str, ...] | None = None
    count: int | None = None
    model: str = "the model"


def map_classes(found: Sequence[str], classes: ModelClasses, where: str) -> dict[str, int]:
    """THE mapping of class folder names (``found``, of the folder ``where``) to the model's output indices,
    in sorted folder order; a one-line error for a name the model does not predict or, without a class list,
    for a count that differs from the model's."""
    found = sorted(found)
    if classes.names is None:
        if classes.count is not None and len(found) != classes.count:
            raise PctuneError(f"{where}: the class list has {len(found)} classes but {classes.model} predicts "
                              f"{classes.count}; class folders are mapped to outputs in sorted order")
        return {name: i for i, name in enumerate(found)}
    index = {name: i for i, name in enumerate(classes.names)}
    for name in found:
        if name not in index:
            raise PctuneError(f"{where}: class folder {name!r} is not one of the {len(index)} classes "
                              f"{classes.model} predicts (e.g. {classes.names[0]!r}); name each class folder "
                              "by the model's class")
    return {name: index[name] for name in found}
