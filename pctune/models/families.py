"""The feedback families pctune knows, one table entry each (as timm's registry holds every fact of a
model in one entry).

What every family's network gives the rest of pctune (the contract the evaluation stages call):

- ``run(x, timesteps, hparams, *, grad_mode="none")``: the logits of every timestep or iteration,
  ``[T+1, batch, classes]``, index 0 the plain feedforward pass; differentiable end to end unless
  ``grad_mode`` is "none";
- ``forward(x)``: the plain feedforward pass (t = 0); ``input_size`` (C, H, W); ``name``.

A family's entry says how its networks are listed, described and built. A third family is one module
(the network, in :mod:`pctune.pc`, and its spec loader, in :mod:`pctune.models`) and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    summary: str
    names: Callable[[], list[str]]  # the registered networks
    describe: Callable[[str], str]  # one line about a registered network


def _predify_names() -> list[str]:
    from pctune.models.registry import list_models

    return list_models()


def _predify_line(name: str) -> str:
    from pctune.models.registry import get_spec

    spec = get_spec(name)
    return f"{spec.num_pcoders} pcoders  {spec.backbone:24s} {spec.description}"


def _cnnf_names() -> list[str]:
    from pctune.models.cnnf import list_cnnf_models

    return list_cnnf_models()


def _cnnf_line(name: str) -> str:
    from pctune.models.cnnf import get_cnnf_spec

    spec = get_cnnf_spec(name)
    size = "x".join(str(v) for v in spec.input_size)
    return f"{len(spec.blocks)} blocks   ind={spec.ind} res={spec.res:<14g} {spec.description} (input {size})"


FAMILIES: dict[str, Family] = {
    "predify": Family("predify", "predictive coding (Predify): per-pcoder beta, lambda, alpha on a fixed network",
                      _predify_names, _predify_line),
    "cnnf": Family("cnnf", "recurrent generative feedback (CNN-F, Huang et al. 2020): trained with its feedback; "
                   "engine and specs only, not searchable yet", _cnnf_names, _cnnf_line),
}
