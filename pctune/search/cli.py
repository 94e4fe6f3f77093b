"""``pctune search JOB`` and ``pctune results JOB``."""

from __future__ import annotations

import argparse
from typing import Any

from pctune.search.job import STRATEGIES
from pctune.search.samplers import SAMPLERS
from pctune.search.schedulers import SCHEDULERS

#: command-line flag -> job field it overrides
_OVERRIDES = {
    "num_samples": "search.num_samples",
    "max_concurrent": "search.max_concurrent_trials",
    "sampler": "search.sampler",
    "seed": "search.seed",
    "space": "search.space",
    "strategy": "search.strategy",
    "scheduler": "search.scheduler",
    "grace_images": "search.grace_images",
    "reduction_factor": "search.reduction_factor",
    "cache_gb": "search.cache_gb",
    "data": "data.path",
    "num_images": "data.num_images",
    "feedback_weights": "model.feedback_weights",
    "backbone_weights": "model.backbone_weights",
    "storage_path": "run.storage_path",
    "address": "run.address",
    "tracking_uri": "tracking.tracking_uri",
    "experiment": "tracking.experiment",
}


def add_search_commands(commands) -> None:
    search = commands.add_parser("search", help="tune beta/lambda/alpha with Ray Tune + Optuna",
                                 description="Run a search job (a name in jobs/ or a job TOML path). "
                                             "Flags override the job's fields.")
    _search_flags(search)
    search.set_defaults(handler=_search)

    check = commands.add_parser("check", help="check a search job without running a trial",
                                description="Everything `pctune search` checks before its first trial (job, space, "
                                            "model and weights, data and labels, masks, tracking store, "
                                            "resources, storage and lock), with the same flags; runs no trial "
                                            "and writes nothing. Exit 0 when the search would start.")
    _search_flags(check)
    check.set_defaults(handler=_check)

    results = commands.add_parser("results", help="the leaderboard of a search; writes leaderboard.csv and "
                                                  "best.toml")
    results.add_argument("job", help="a job name in jobs/ or a job TOML path")
    job_flags(results)
    results.add_argument("--top", type=int, default=20, help="rows to print (0: all)")
    results.set_defaults(handler=_results)

    sync = commands.add_parser("sync", help="upload to MLflow what a search logged nowhere (a server that was down)")
    sync.add_argument("job", help="a job name in jobs/ or a job TOML path")
    job_flags(sync)
    sync.add_argument("--tracking-uri", help="MLflow tracking URI (default: the search's)")
    sync.add_argument("--register-incomplete", action="store_true",
                      help="register the best configuration as @champion even if the search did not run to its end")
    sync.set_defaults(handler=_sync)


def _search_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``pctune search`` (``pctune check`` takes the same, to check the same search)."""
    parser.add_argument("job", help="a job name in jobs/ (e.g. demo) or a job TOML path")
    job_flags(parser)
    parser.add_argument("--num-samples", type=int, help="trials (per pcoder with the per-pcoder strategy); with "
                                                         "--resume, a larger count extends the search")
    parser.add_argument("--max-concurrent", type=int, help="trials running at once")
    parser.add_argument("--sampler", choices=list(SAMPLERS),
                        help="; ".join(f"{name}: {kind.description}" for name, kind in SAMPLERS.items()))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--space", help="a search space name in search_spaces/ or a TOML path")
    parser.add_argument("--strategy", choices=list(STRATEGIES))
    parser.add_argument("--scheduler", choices=list(SCHEDULERS),
                        help="fifo: every trial sees every image; asha/hyperband: stop unpromising trials early")
    parser.add_argument("--grace-images", type=int, help="images a trial sees before it can be stopped")
    parser.add_argument("--reduction-factor", type=float, help="asha/hyperband: keep 1 in this many at each rung")
    parser.add_argument("--cache-gb", type=float, help="memory per worker for reusing timestep 0 (0: off)")
    parser.add_argument("--data", help="the ImageNet validation folder")
    parser.add_argument("--num-images", type=int)
    parser.add_argument("--feedback-weights", help="decoder weights (file or Predify folder)")
    parser.add_argument("--backbone-weights", help="a local backbone state dict")
    parser.add_argument("--address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--gpus-per-trial", type=float, help="GPUs per trial (fractions share a GPU)")
    parser.add_argument("--cpus-per-trial", type=float)
    parser.add_argument("--tracking-uri", help="MLflow tracking URI")
    parser.add_argument("--experiment", help="MLflow experiment name")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted search of the same job (a changed job is refused)")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier search of this job first")
    parser.add_argument("--verbose", action="store_true", help="also show Ray Tune's status tables")


def job_flags(parser: argparse.ArgumentParser) -> None:
    """``--storage-path`` and ``--set``: the flags of every command that loads a job (read by :func:`job_overrides`)."""
    parser.add_argument("--storage-path", help="where runs are kept (default: the job's, ./pctune_runs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any job field, e.g. --set objective.sigma=0.75 (repeatable)")


def job_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The job fields the flags of ``args`` override."""
    from pctune.search.job import parse_assignment

    overrides = {field: getattr(args, flag) for flag, field in _OVERRIDES.items()
                 if getattr(args, flag, None) is not None}
    if getattr(args, "gpus_per_trial", None) is not None:
        overrides["search.resources.gpu"] = args.gpus_per_trial
    if getattr(args, "cpus_per_trial", None) is not None:
        overrides["search.resources.cpu"] = args.cpus_per_trial
    if getattr(args, "overwrite", False):
        overrides["run.if_exists"] = "overwrite"
    if getattr(args, "verbose", False):
        overrides["run.verbose"] = True
    for item in args.set:
        key, value = parse_assignment(item)
        overrides[key] = value
    return overrides


def _search(args: argparse.Namespace) -> int:
    from pctune.pipeline import search
    from pctune.search.job import load_job

    job = load_job(args.job, job_overrides(args))
    job.resume = args.resume
    search(job)
    return 0


def _check(args: argparse.Namespace) -> int:
    from pctune.check import check
    from pctune.search.job import load_job

    job = load_job(args.job, job_overrides(args))
    job.resume = args.resume
    check(job)
    return 0


def _sync(args: argparse.Namespace) -> int:
    from pctune.pipeline import sync
    from pctune.search.job import load_job

    job = load_job(args.job, job_overrides(args))
    sync(job, args.tracking_uri, register_incomplete=args.register_incomplete)
    return 0


def _results(args: argparse.Namespace) -> int:
    from pctune.search.job import load_job
    from pctune.search.results import write_results

    job = load_job(args.job, job_overrides(args))
    write_results(job, top=args.top or None)
    return 0
