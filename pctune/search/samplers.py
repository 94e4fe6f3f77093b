"""The Optuna samplers a job can name (``[search] sampler``, ``pctune search --sampler``).

:data:`SAMPLERS` is the one table of sampler names: job validation and the ``--sampler`` choices
derive from it. Importing this module does not import Optuna; :func:`make_sampler` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from pctune.errors import PctuneError


class SamplerKind(NamedTuple):
    description: str
    factory: Callable[[int, int], Any]  # (seed, concurrent trials) -> an Optuna sampler
    # learns from constraint values (Optuna's Trial.set_constraint): objective.combine = "constraints"
    constraints: bool = False
    # searches several objectives at once: objective.combine = "pareto"
    multi_objective: bool = False


def _tpe(seed: int, concurrent: int):
    import optuna

    # constant_liar: trials running at once do not all propose the same point
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=concurrent > 1)


def _tpe_mf(seed: int, concurrent: int):
    from pctune.search.mf_tpe import FidelityTPESampler

    return FidelityTPESampler(seed=seed, multivariate=True, constant_liar=concurrent > 1)


def _cmaes(seed: int, concurrent: int):
    import optuna

    return optuna.samplers.CmaEsSampler(seed=seed)


def _gp(seed: int, concurrent: int):
    import optuna

    return optuna.samplers.GPSampler(seed=seed)


def _random(seed: int, concurrent: int):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _nsga2(seed: int, concurrent: int):
    import optuna

    return optuna.samplers.NSGAIISampler(seed=seed)


#: sampler name -> what it is and how to make it; in the order the documentation and errors list them
SAMPLERS: dict[str, SamplerKind] = {
    "tpe": SamplerKind("multivariate tree-structured Parzen estimator (constant liar when trials run at once)", _tpe,
                       constraints=True, multi_objective=True),
    "tpe-mf": SamplerKind("multi-fidelity TPE for asha/hyperband searches: models the largest number of images "
                          "seen that enough trials reached (after BOHB)", _tpe_mf),
    "cmaes": SamplerKind("CMA evolution strategy (needs the cmaes package)", _cmaes),
    "gp": SamplerKind("Gaussian-process Bayesian optimization", _gp, constraints=True),
    "random": SamplerKind("independent uniform sampling", _random),
    "nsga2": SamplerKind("NSGA-II genetic algorithm (for Pareto searches)", _nsga2, constraints=True,
                         multi_objective=True),
}
#: samplers that learn from constraint values / that search several objectives at once; tpe-mf is in
#: neither (it falls back to plain TPE on such studies, so job validation refuses it there)
CONSTRAINED = tuple(name for name, kind in SAMPLERS.items() if kind.constraints)
MULTI_OBJECTIVE = tuple(name for name, kind in SAMPLERS.items() if kind.multi_objective)


def make_sampler(name: str, seed: int, concurrent: int, source: str = "<job>"):
    """The Optuna sampler named in the job, seeded; ``concurrent``: trials running at once."""
    import optuna

    if name not in SAMPLERS:
        raise PctuneError(f"{source}: search.sampler: unknown sampler {name!r} ({', '.join(SAMPLERS)})")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError as exc:
            raise PctuneError(f"{source}: search.sampler = 'cmaes' needs the cmaes package "
                              "(pip install cmaes)") from exc
    return SAMPLERS[name].factory(seed, concurrent)
