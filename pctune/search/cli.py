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
    search.add_argument("job", help="a job name in jobs/ (e.g. demo) or a job TOML path")
    _job_flags(search)
    search.add_argument("--num-samples", type=int, help="trials (per pcoder with the per-pcoder strategy); with "
                                                         "--resume, a larger count extends the search")
    search.add_argument("--max-concurrent", type=int, help="trials running at once")
    search.add_argument("--sampler", choices=list(SAMPLERS),
                        help="; ".join(f"{name}: {kind.description}" for name, kind in SAMPLERS.items()))
    search.add_argument("--seed", type=int)
    search.add_argument("--space", help="a search space name in search_spaces/ or a TOML path")
    search.add_argument("--strategy", choices=list(STRATEGIES))
    search.add_argument("--scheduler", choices=list(SCHEDULERS),
                        help="fifo: every trial sees every image; asha/hyperband: stop unpromising trials early")
    search.add_argument("--grace-images", type=int, help="images a trial sees before it can be stopped")
    search.add_argument("--reduction-factor", type=float, help="asha/hyperband: keep 1 in this many at each rung")
    search.add_argument("--cache-gb", type=float, help="memory per worker for reusing timestep 0 (0: off)")
    search.add_argument("--data", help="the ImageNet validation folder")
    search.add_argument("--num-images", type=int)
    search.add_argument("--feedback-weights", help="decoder weights (file or Predify folder)")
    search.add_argument("--backbone-weights", help="a local backbone state dict")
    search.add_argument("--address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    search.add_argument("--gpus-per-trial", type=float, help="GPUs per trial (fractions share a GPU)")
    search.add_argument("--cpus-per-trial", type=float)
    search.add_argument("--tracking-uri", help="MLflow tracking URI")
    search.add_argument("--experiment", help="MLflow experiment name")
    search.add_argument("--resume", action="store_true",
                        help="continue an interrupted search of the same job (a changed job is refused)")
    search.add_argument("--overwrite", action="store_true", help="delete an earlier search of this job first")
    search.add_argument("--verbose", action="store_true", help="also show Ray Tune's status tables")
    search.set_defaults(handler=_search)

    results = commands.add_parser("results", help="the leaderboard of a search; writes leaderboard.csv and "
                                                  "best.toml")
    results.add_argument("job", help="a job name in jobs/ or a job TOML path")
    _job_flags(results)
    results.add_argument("--top", type=int, default=20, help="rows to print (0: all)")
    results.set_defaults(handler=_results)

    sync = commands.add_parser("sync", help="upload to MLflow what a search logged nowhere (a server that was down)")
    sync.add_argument("job", help="a job name in jobs/ or a job TOML path")
    _job_flags(sync)
    sync.add_argument("--tracking-uri", help="MLflow tracking URI (default: the search's)")
    sync.add_argument("--register-incomplete", action="store_true",
                      help="register the best configuration as @champion even if the search did not run to its end")
    sync.set_defaults(handler=_sync)


def _job_flags(parser: argparse.ArgumentParser) -> None:
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
