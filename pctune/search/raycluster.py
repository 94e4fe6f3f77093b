"""Ray for the search: join a cluster or start a local Ray (:mod:`pctune.localray`), and check that a
trial's resources fit before the first trial waits for them forever."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from pctune import localray
from pctune.errors import PctuneError
from pctune.search.job import Job
from pctune.utils import Log, print_line


def connect(address: str | None, log: Log = print_line) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``), else start a local Ray; reuse a Ray that
    this process already initialized."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address(address)
    if address:
        log(f"connecting to the Ray cluster at {address}")
        localray.init(address, log_to_driver=False, runtime_env=_runtime_env())
    else:
        # address="local": never join some other Ray that happens to run on this machine. Its processes
        # run in a session of their own, so a SIGTERM to our process group stops the search, not Ray.
        localray.init_local(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                            **_preload_trial_modules())
    resources = ray.cluster_resources()
    log(f"Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")


def check_resources(job: Job, log: Log = print_line) -> None:
    """A trial that asks for more than the cluster has would wait forever: an error on a local Ray, a
    warning on a cluster (which may scale up)."""
    flags = {"GPU": ("gpu", "--gpus-per-trial"), "CPU": ("cpu", "--cpus-per-trial")}
    check_fits({ray_key: job.search.resources[key] for ray_key, (key, _flag) in flags.items()},
               lambda ray_key, want, have: (f"{job.source}: search.resources.{flags[ray_key][0]} = {want:g} per "
                                            f"trial but the Ray cluster has {have:g} (set {flags[ray_key][1]})"),
               local=cluster_address(job) is None, log=log)


def check_fits(want: Mapping[str, float], message: Callable[[str, float, float], str], local: bool,
               log: Log = print_line) -> None:
    """Each Ray resource of ``want`` (``"CPU"``, ``"GPU"``) against what the Ray has: ``message(key, want,
    have)`` as an error on a local Ray, as a warning on a cluster (which may scale up). A local Ray's
    resources are this machine's, known before Ray starts (so a refused command starts no Ray); a
    cluster's are asked of Ray, after connecting (before that, nothing is checked)."""
    import ray

    if ray.is_initialized():
        have = ray.cluster_resources()
    elif local:
        have = local_resources()
    else:
        return
    for key, amount in want.items():
        if amount > have.get(key, 0):
            text = message(key, amount, have.get(key, 0))
            if local:
                raise PctuneError(text)
            log(f"warning: {text}")


def cluster_address(job: Job) -> str | None:
    """The Ray cluster the search joins (``run.address``, else ``$RAY_ADDRESS``); None: a local Ray."""
    return ray_address(job.run.address)


def ray_address(address: str | None) -> str | None:
    """The cluster to join: ``address``, else ``$RAY_ADDRESS``; None: a local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def local_resources() -> dict[str, float]:
    """What a local Ray started by :func:`connect` has: every CPU, every visible GPU (as Ray counts them)."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


#: what a trial's worker imports before its first evaluation (``python -X importtime``, 2-core machine):
#: torch 1.9 s, Ray Tune 0.9 s, the sympy that torch's first ``autograd.grad`` imports 0.4 s, pctune 0.05 s
TRIAL_MODULES = ("torch", "torch.fx.experimental.symbolic_shapes", "ray.tune", "pctune.search.trainable")


def _preload_trial_modules() -> dict:
    """With ``PCTUNE_PRELOAD=1``: Ray's option to import :data:`TRIAL_MODULES` in every worker of a local
    Ray before it takes work. The workers Ray starts with it (one per CPU) do so while the driver
    starts the search, and the first trial's actor takes one of them (experiment start 2.5 -> 1.7 s on
    2 cores). Off by default: every other worker pays the imports too (promotion tasks, Ray Train
    workers, a second prestarted worker that no trial takes), which made the test suite's Ray Train and
    promotion tests 15-25% slower on 2 cores."""
    if os.environ.get("PCTUNE_PRELOAD", "0") != "1":
        return {}
    return {"_system_config": {"preload_python_modules": list(TRIAL_MODULES)}}


def _runtime_env() -> dict:
    """Ship this pctune package to the cluster's workers (its dependencies must be installed there), so
    the nodes run the driver's version of the code. ``PCTUNE_SHIP_CODE=0`` turns it off (pctune is
    installed on every node)."""
    if os.environ.get("PCTUNE_SHIP_CODE", "1") == "0":
        return {}
    import pctune

    return {"py_modules": [str(Path(pctune.__file__).parent)]}


