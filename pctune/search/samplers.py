"""PROVISIONAL (replaced by the jobs branch): the Optuna samplers."""

from __future__ import annotations

from pctune.errors import PctuneError


def make_sampler(name: str, seed: int, concurrent: int, source: str = "<job>"):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=concurrent > 1)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError as exc:
            raise PctuneError(f"{source}: search.sampler = 'cmaes' needs the cmaes package "
                              "(pip install cmaes)") from exc
        return optuna.samplers.CmaEsSampler(seed=seed)
    raise PctuneError(f"{source}: search.sampler: unknown sampler {name!r}")
