"""The names of every metric a trial reports, built and classified in one place.

Producers (the objectives, the trainable) build names with the functions below; readers (tracking,
the replay of a resumed search, the leaderboard) classify them with :func:`step_metric` and
:func:`is_trial_metric`. No other module spells a metric name pattern or parses one: a new family
of names is one builder and one pattern here (:data:`_STEP` for a curve over timesteps,
:data:`_SCALAR` for a scalar).

The families (``<c>`` a robust objective's condition name, ``<n>`` a pcoder, ``<t>`` a timestep):

- ``mean_ce``: the paper's objective (``METRIC``, minimized); ``ce_t<t>``, ``accuracy_t<t>``;
  ``recon_error_pc<n>`` and ``recon_error_pc<n>_t<t>``;
- a robust objective's ``mean_ce_<c>``, ``diverged_<c>``, ``ce_<c>_t<t>``, ``accuracy_<c>_t<t>``,
  ``constraint_<c>_<metric>`` and ``feasible``;
- the ``cam_iou`` objective's ``cam_iou``, ``cam_iou_t<t>``, ``cam_iou_rel`` and ``cam_seconds``;
- bookkeeping: ``diverged``, ``num_images`` (the fidelity: images seen), ``total_images``, ``final``,
  ``eval_seconds``, ``model_loads``, ``gpu``, ``t0_cached``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

METRIC = "mean_ce"  # the paper's objective: mean cross-entropy over t = 1..T
MODE = "min"
FIDELITY = "num_images"  # images seen: what the schedulers read as time
CAM_IOU = "cam_iou"
CAM_IOU_REL = "cam_iou_rel"
FEASIBLE = "feasible"
#: what every trial reports besides its objective's scores (never an MLflow metric but the first three)
BOOKKEEPING = ("diverged", "num_images", "total_images", "final", "eval_seconds", "model_loads", "gpu", "t0_cached",
               "cam_seconds")
LOGGED_BOOKKEEPING = ("diverged", "num_images", "total_images")


# -- builders -------------------------------------------------------------------------------------------
def at_timestep(name: str, t: int) -> str:
    """``ce`` at t = 3 -> ``ce_t3``; also ``accuracy``, ``recon_error_pc2``, ``cam_iou``, ``ce_<c>``."""
    return f"{name}_t{t}"


def of_condition(name: str, condition: str) -> str:
    """A robust objective's per-condition score: ``mean_ce``, ``noise`` -> ``mean_ce_noise``."""
    return f"{name}_{condition}"


def recon_error(pcoder: int) -> str:
    return f"recon_error_pc{pcoder}"


def constraint(condition: str, metric: str) -> str:
    """A robust objective's constraint value (feasible when <= 0)."""
    return f"constraint_{condition}_{metric}"


# -- classifiers ----------------------------------------------------------------------------------------
# ce_t3, accuracy_t3, a condition's ce_noise_t3 / accuracy_clean_t10, recon_error_pc2_t3: a curve over t
_STEP = re.compile(r"^((?:ce|accuracy)(?:_[a-z0-9_]+?)?)_t(\d+)$|^(recon_error_pc\d+)_t(\d+)$")
_PAPER = re.compile(r"^(mean_ce|recon_error_pc\d+)$")  # the paper's scalars (its curves over t are _STEP's)
# what MLflow gets at step 0 under its own name: a robust objective's and the cam_iou objective's scalars
_SCALAR = re.compile(r"^(mean_ce_|diverged_|constraint_)[a-z0-9_]+$|^feasible$|^cam_iou(_t\d+|_rel)?$")


def step_metric(key: str) -> tuple[str, int] | None:
    """``ce_t3`` -> (``ce``, 3), ``accuracy_clean_t10`` -> (``accuracy_clean``, 10), ``recon_error_pc2_t3``
    -> (``recon_error_pc2``, 3); None for any other name."""
    match = _STEP.match(key)
    if not match:
        return None
    return match.group(1) or match.group(3), int(match.group(2) or match.group(4))


def is_condition_score(key: str) -> bool:
    """A robust objective's per-condition mean CE (``mean_ce_<c>``)."""
    return key.startswith(f"{METRIC}_")


def is_trial_metric(key: str, extra: Iterable[str] = ()) -> bool:
    """A value a trial itself reports (not one Ray Tune adds): a family above, or one of ``extra``
    (an objective's own names, :attr:`pctune.search.objectives.Objective.reported`)."""
    return (key in BOOKKEEPING or bool(_PAPER.match(key)) or step_metric(key) is not None
            or is_scalar_metric(key, extra))


def is_scalar_metric(key: str, extra: Iterable[str] = ()) -> bool:
    """Logged to MLflow once (step 0) under its own name: the bookkeeping MLflow shows, a robust or
    cam_iou objective's scalars, and ``extra`` (an objective's own names)."""
    return key in LOGGED_BOOKKEEPING or bool(_SCALAR.match(key)) or key in extra
