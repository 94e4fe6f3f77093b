"""Robust objectives: several evaluation conditions scored in one trial, and how they combine.

A condition is a perturbation of the search's fixed images: Gaussian noise at a sigma (in normalized
space, drawn once from the noise seed, like the paper's objective), the clean images, or one generated
ImageNet-C corruption at a severity (the ``imagecorruptions`` functions of the ImageNet-C stage, seeded
per image). Each has its own timestep horizon. A trial scores every condition on the same images and
reports, per condition ``c``: ``mean_ce_c``, ``ce_c_t{t}``, ``accuracy_c_t{t}``; the first condition's
metrics are also reported without the suffix (what the leaderboard and the summary plots show).

``objective.combine`` chooses what the search minimizes (``mean_ce``):

- ``"aggregate"``: the weighted mean of the conditions' mean CEs (``weight``, default 1);
- ``"constraints"``: the same weighted mean (give a condition weight 0 to use it only in constraints),
  subject to ``objective.constraints``; each constraint's value is reported as ``constraint_c_metric``
  (feasible when <= 0) and ``feasible`` says whether all hold. Optuna's sampler gets the values through
  ``Trial.set_constraint`` and learns where the feasible region is; an infeasible trial is kept and marked,
  never ranked (so never a champion);
- ``"pareto"``: the mean CEs of the conditions in ``objective.pareto`` (2 or 3) as separate objectives
  (Optuna's multi-objective TPE or NSGA-II); constraints, if any, also apply. The champion is the member
  of the Pareto front (among feasible configurations) with the lowest mean CE on the first of them.

A constraint bounds a condition's dynamics against its own timestep 0 (the feedforward pass):
``metric = "accuracy"``: at every t = 1..T, accuracy_t >= accuracy_0 - tolerance; ``metric = "ce"``: at
every t, ce_t <= ce_0 + tolerance. The reported value is the worst shortfall minus the tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pctune.metrics import FEASIBLE, METRIC, at_timestep, constraint, of_condition
from pctune.schema import at_least, error, read_table

CONDITION_KINDS = ("noise", "clean", "corruption")
COMBINE = ("aggregate", "constraints", "pareto")
CONSTRAINT_METRICS = ("accuracy", "ce")
STANDARD_MIX = "standard"  # a corruption condition over the 15 standard corruptions, image by image


@dataclass
class Condition:
    name: str
    kind: str = "noise"
    sigma: float = 0.5  # "noise": in normalized space
    # "corruption": an imagecorruptions name, e.g. "fog", or "standard": the 15 standard corruptions of
    # ImageNet-C at severities 1..5, image by image (every pair equally often): a one-condition stand-in
    # for mCE
    corruption: str | None = None
    severity: int | None = None  # "corruption": 1..5 (default 3; "standard": all five unless given)
    timesteps: int | None = None  # default: objective.timesteps
    weight: float = 1.0  # in the weighted mean (aggregate, constraints)


@dataclass
class Constraint:
    condition: str
    metric: str = "accuracy"  # "accuracy" | "ce"
    tolerance: float = 0.0  # accuracy as a fraction (0.005 = half a point); CE in nats

    @property
    def key(self) -> str:
        return constraint(self.condition, self.metric)


@dataclass
class RobustObjective:
    """The parsed conditions, combination and constraints of a job's ``[objective]``."""

    conditions: list[Condition]
    combine: str = "aggregate"
    constraints: list[Constraint] = field(default_factory=list)
    pareto: list[str] = field(default_factory=list)

    @property
    def objectives(self) -> list[str]:
        """The metrics the sampler minimizes: ``mean_ce``, or the Pareto objectives."""
        return [of_condition(METRIC, c) for c in self.pareto] if self.combine == "pareto" else [METRIC]

    @property
    def constraint_keys(self) -> list[str]:
        return [c.key for c in self.constraints]

    def champion_rule(self) -> str:
        feasible = " among configurations meeting every constraint" if self.constraints else ""
        if self.combine == "pareto":
            return f"lowest {self.objectives[0]} on the Pareto front of {', '.join(self.objectives)}{feasible}"
        return f"lowest {METRIC} (weighted mean over conditions){feasible}"


# -- the job's [objective] keys -------------------------------------------------------------------------
def read_robust(conditions: list, combine: str, constraints: list, pareto: list, timesteps: int,
                source: str) -> RobustObjective | None:
    """The robust objective of a job's ``[objective]`` table, checked (None: the paper's single condition)."""
    if combine not in COMBINE:
        raise error(source, "objective.combine", f"unknown combination {combine!r} ({', '.join(COMBINE)})")
    if not conditions:
        for key, value in (("constraints", constraints), ("pareto", pareto)):
            if value:
                raise error(source, f"objective.{key}", "needs objective.conditions")
        if combine != "aggregate":
            raise error(source, "objective.combine", "needs objective.conditions")
        return None
    conds = [_condition(c, i, timesteps, source) for i, c in enumerate(conditions, start=1)]
    names = [c.name for c in conds]
    for i, name in enumerate(names, start=1):
        if names.index(name) != i - 1:
            raise error(source, f"objective.conditions[{i}].name", f"{name!r} is used twice")
    cons = [read_table(Constraint, c, source, f"objective.constraints[{i}]") for i, c in enumerate(constraints, 1)]
    for i, con in enumerate(cons, start=1):
        where = f"objective.constraints[{i}]"
        if con.condition not in names:
            raise error(source, f"{where}.condition", f"no condition named {con.condition!r} ({', '.join(names)})")
        if con.metric not in CONSTRAINT_METRICS:
            raise error(source, f"{where}.metric",
                        f"must be one of {', '.join(CONSTRAINT_METRICS)}, got {con.metric!r}")
    if combine == "constraints" and not cons:
        raise error(source, "objective.constraints", "combine = 'constraints' needs at least one constraint")
    if combine == "pareto":
        if not 2 <= len(pareto) <= 3:
            raise error(source, "objective.pareto", f"must name 2 or 3 conditions, got {len(pareto)}")
        for name in pareto:
            if name not in names:
                raise error(source, "objective.pareto", f"no condition named {name!r} ({', '.join(names)})")
    elif pareto:
        raise error(source, "objective.pareto", "only with combine = 'pareto'")
    if combine != "pareto" and not any(c.weight > 0 for c in conds):
        raise error(source, "objective.conditions", "at least one condition needs a weight > 0")
    return RobustObjective(conds, combine, cons, list(pareto))


_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")


def _condition(table: object, i: int, timesteps: int, source: str) -> Condition:
    where = f"objective.conditions[{i}]"
    cond = read_table(Condition, table, source, where)
    if not cond.name or not set(cond.name) <= _NAME_CHARS:
        raise error(source, f"{where}.name", f"{cond.name!r}: use lower-case letters, digits and '_' "
                    "(it becomes part of metric names)")
    if cond.kind not in CONDITION_KINDS:
        raise error(source, f"{where}.kind", f"unknown kind {cond.kind!r} ({', '.join(CONDITION_KINDS)})")
    at_least(cond.sigma, 0, source, f"{where}.sigma")
    at_least(cond.weight, 0, source, f"{where}.weight")
    at_least(cond.timesteps, 1, source, f"{where}.timesteps")
    cond.timesteps = cond.timesteps or timesteps
    if cond.kind == "corruption":
        from pctune.measure.corruptions import extra_corruptions, standard_corruptions

        known = standard_corruptions() + extra_corruptions() + [STANDARD_MIX]
        if cond.corruption not in known:
            raise error(source, f"{where}.corruption", f"unknown corruption {cond.corruption!r} ({', '.join(known)})")
        if cond.severity is not None and not 1 <= cond.severity <= 5:
            raise error(source, f"{where}.severity", f"must be 1..5, got {cond.severity}")
    elif cond.corruption is not None:
        raise error(source, f"{where}.corruption", "only for kind = 'corruption'")
    return cond


# -- the images of a condition ----------------------------------------------------------------------------
def condition_images(cond: Condition, clean: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     seed: int) -> torch.Tensor:
    """``clean`` (normalized images [N, C, H, W]) perturbed as ``cond`` says, still normalized."""
    from pctune.data.noise import add_gaussian_noise

    if cond.kind == "clean":
        return clean.clone()
    if cond.kind == "noise":
        return add_gaussian_noise(clean, cond.sigma, seed)
    from PIL import Image

    from pctune.measure.corruptions import CShard, corrupt_image

    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    pixels = ((clean * s + m).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if cond.corruption == STANDARD_MIX:
        from pctune.measure.corruptions import standard_corruptions

        severities = [cond.severity] if cond.severity else [1, 2, 3, 4, 5]
        # image i: corruption i mod 15, severity (i div 15) mod 5: all 75 pairs in turn
        shards = [CShard(name, severity) for severity in severities for name in standard_corruptions()]
    else:
        shards = [CShard(cond.corruption, cond.severity or 3)]
    out = []
    for i, img in enumerate(pixels):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("RGB")
        corrupted = corrupt_image(pil, shards[i % len(shards)], seed, i)
        array = np.asarray(corrupted.convert("L") if clean.shape[1] == 1 else corrupted, dtype=np.float32)
        out.append(torch.from_numpy(array.reshape(*img.shape[:2], -1).copy()).permute(2, 0, 1) / 255.0)
    return (torch.stack(out) - m) / s


# -- combining the conditions' metrics --------------------------------------------------------------------
#: the per-condition metrics a trial reports (``{key}_{condition}`` or ``ce_{condition}_t{t}``)
_PER_TIMESTEP = ("ce", "accuracy")


def condition_metrics(name: str, metrics: Mapping[str, float], timesteps: int) -> dict[str, float]:
    """One condition's metrics renamed: ``mean_ce_{name}``, ``diverged_{name}``, ``ce_{name}_t{t}``, ..."""
    out = {of_condition(METRIC, name): metrics[METRIC], of_condition("diverged", name): metrics["diverged"]}
    for key in _PER_TIMESTEP:
        out.update({at_timestep(of_condition(key, name), t): metrics[at_timestep(key, t)]
                    for t in range(timesteps + 1)})
    return out


def constraint_value(con: Constraint, metrics: Mapping[str, float], timesteps: int) -> float:
    """The worst shortfall of ``con``'s condition against its timestep 0, minus the tolerance (<= 0:
    met). A diverged condition fails every constraint on it (value 1)."""
    name = con.condition
    if metrics.get(of_condition("diverged", name), 0.0):
        return 1.0
    first = metrics[at_timestep(of_condition(con.metric, name), 0)]
    later = [metrics[at_timestep(of_condition(con.metric, name), t)] for t in range(1, timesteps + 1)]
    worst = first - min(later) if con.metric == "accuracy" else max(later) - first
    return float(worst - con.tolerance)


def combine(robust: RobustObjective, by_condition: Mapping[str, Mapping[str, float]],
            penalty: float) -> dict[str, float]:
    """One trial result from the conditions' results (each :func:`pctune.search.objective.score_chunks`
    output): the first condition's metrics as they are, every condition's renamed, the weighted
    ``mean_ce`` (the penalty if any condition diverged), the constraint values and ``feasible``."""
    first = robust.conditions[0].name
    out = dict(by_condition[first])
    for cond in robust.conditions:
        out.update(condition_metrics(cond.name, by_condition[cond.name], cond.timesteps))
    diverged = any(m["diverged"] for m in by_condition.values())
    weights = {c.name: c.weight for c in robust.conditions}
    total = sum(weights.values()) or 1.0
    mean = sum(w * by_condition[n][METRIC] for n, w in weights.items()) / total
    out[METRIC] = penalty if diverged else float(mean)
    out["diverged"] = float(diverged)
    if diverged:  # every objective at the penalty: a failed point never looks good on any axis
        out.update({of_condition(METRIC, c.name): penalty for c in robust.conditions})
    timesteps = {c.name: c.timesteps for c in robust.conditions}
    values = [constraint_value(con, out, timesteps[con.condition]) for con in robust.constraints]
    out.update({con.key: v for con, v in zip(robust.constraints, values, strict=True)})
    if robust.constraints:
        out[FEASIBLE] = float(all(v <= 0 for v in values))
    out["num_images"] = min(m["num_images"] for m in by_condition.values())
    out["final"] = float(diverged or all(m["final"] for m in by_condition.values()))
    out["eval_seconds"] = sum(m["eval_seconds"] for m in by_condition.values())
    return out


def lockstep(robust: RobustObjective, streams: Mapping[str, Iterator[dict[str, float]]],
             penalty: float) -> Iterator[dict[str, float]]:
    """Advance every condition's :func:`score_chunks` stream to the same report point and yield the
    combined result, until it is final (every image scored, or a condition diverged)."""
    while True:
        by_condition = {name: next(stream) for name, stream in streams.items()}
        result = combine(robust, by_condition, penalty)
        yield result
        if result["final"]:
            return


# -- the Pareto front ---------------------------------------------------------------------------------------
def pareto_front(points: Sequence[Sequence[float]]) -> list[bool]:
    """For each point (objectives, all minimized), whether no other point dominates it (no worse on
    every objective and better on one). Non-finite points are never on the front."""
    finite = [all(math.isfinite(v) for v in p) for p in points]
    return [finite[i] and not any(finite[j] and _dominates(q, p) for j, q in enumerate(points) if j != i)
            for i, p in enumerate(points)]


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))
