"""The ``pctune`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pctune import interrupts, localray
from pctune.errors import Interrupted, PctuneError, write_error


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    interrupts.enable()
    code, message = 1, None
    try:
        code, message = _run(args, list(sys.argv[1:] if argv is None else argv))
    finally:
        if code != 0:  # stopped or failed: the local Ray this command started goes first, then the last line
            localray.shutdown()  # (after a success Ray's own exit hook stops it; in-process callers reuse it)
    if message:
        print(message, file=sys.stderr)
    return code


def _run(args: argparse.Namespace, argv: list[str]) -> tuple[int, str | None]:
    """The command's exit code and, when it failed or stopped, its one line for stderr."""
    try:
        return int(args.handler(args) or 0), None
    except Interrupted as exc:
        return interrupts.exit_code(), f"pctune: {interrupts.signal_name()}: {exc.resume_message(argv)}"
    except PctuneError as exc:
        return 2, f"pctune: error: {exc}"
    except KeyboardInterrupt:
        return interrupts.exit_code(), f"pctune: interrupted ({interrupts.signal_name()})"
    except Exception as exc:  # a full disk or another failed write, pctune's own or Ray Tune's: one line
        line = write_error(exc)
        if line is None:
            raise
        return 1, f"pctune: error: {line}"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (``pctune search: error: ...``) like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pctune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pctune {_version()}")
    commands = parser.add_subparsers(title="commands")

    models = commands.add_parser("models", help="list the registered models")
    models.set_defaults(handler=_models)

    train = commands.add_parser("train-feedback", help="train a model's feedback decoders (paper Eq. 3)")
    train.add_argument("model", help="a registered model name or a model spec TOML")
    train.add_argument("--data", required=True, help="an ImageFolder tree (root/<class>/<image>)")
    train.add_argument("--out", default=None, help="checkpoint directory (default: runs/feedback/MODEL)")
    train.add_argument("--epochs", type=int, default=5)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--image-size", type=int, default=None, help="crop size (default: the model's)")
    train.add_argument("--workers", type=int, default=2, help="data-loading processes")
    train.add_argument("--pretrained", action="store_true", help="download the backbone's ImageNet weights")
    train.add_argument("--backbone-weights", default=None, help="a local state dict for the backbone")
    train.add_argument("--feedback-weights", default=None, help="start the decoders from these weights")
    train.add_argument("--device", default=None, help="cuda, cpu, ... (default: a GPU when present)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--num-workers", type=int, default=1,
                       help="training processes: 1 trains in this process, more on Ray Train (DDP; --batch-size "
                            "is the global batch, split among them)")
    train.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per Ray Train worker (nccl)")
    train.add_argument("--address", default=None, help="the Ray cluster to train on (default: $RAY_ADDRESS, else "
                                                       "a local Ray)")
    train.add_argument("--val-fraction", type=float, default=0.1,
                       help="images held out (seeded) to measure the reconstruction every epoch (0: none)")
    train.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints inside an epoch "
                                                                       "(default: at epoch ends only)")
    train.add_argument("--patience", type=int, default=0,
                       help="stop after this many epochs without a lower held-out loss (default: never)")
    train.add_argument("--precision", default="fp32", help="fp32, or bf16 / fp16 autocast on a GPU")
    train.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                                            "else ./mlflow.db)")
    train.add_argument("--experiment", default=None, help="MLflow experiment (default: MODEL-feedback)")
    train.set_defaults(handler=_train_feedback)

    from pctune.evaluate.settings import STAGE_SETTINGS
    from pctune.search.cli import add_search_commands, job_flags

    add_search_commands(commands)

    promote = commands.add_parser("promote", help="evaluate the k best configurations of a finished search")
    promote.add_argument("job", help="a job name in jobs/ or a job TOML path")
    promote.add_argument("--top-k", type=int, default=None, help="configurations to promote (default: the job's)")
    promote.add_argument("--stages", default=None, help=f"comma-separated: {','.join(STAGE_SETTINGS)} "
                                                        "(default: the job's [promotion] stages)")
    job_flags(promote)
    promote.add_argument("--tracking-uri", help="MLflow tracking URI (default: the search's)")
    promote.set_defaults(handler=_promote)

    evaluate = commands.add_parser("evaluate", help="run one promotion stage on one configuration")
    evaluate.add_argument("stage", choices=list(STAGE_SETTINGS))
    evaluate.add_argument("--model", required=True, help="a registered model name or a model spec TOML")
    evaluate.add_argument("--hparams", required=True, help="a hyperparameter TOML (pctune results writes best.toml) "
                                                           "or a preset name of the model")
    evaluate.add_argument("--data", required=True, help="an ImageNet-style val folder (clean images), or 'digits'")
    evaluate.add_argument("--out", required=True, help="output directory (shards are checkpointed there)")
    evaluate.add_argument("--pretrained", action="store_true")
    evaluate.add_argument("--backbone-weights", default=None)
    evaluate.add_argument("--feedback-weights", default=None)
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="stage setting, e.g. --set timesteps=10 --set source=released --set path=DIR")
    evaluate.set_defaults(handler=_evaluate)
    return parser


def _version() -> str:
    from pctune import __version__

    return __version__


def _models(args: argparse.Namespace) -> int:
    from pctune.models.families import FAMILIES

    for i, family in enumerate(FAMILIES.values()):
        print(f"{chr(10) if i else ''}{family.name}: {family.summary}")
        for name in family.names():
            print(f"{name:12s} {family.describe(name)}")
    return 0


def _train_feedback(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from pctune.feedback.cluster import Workers
    from pctune.feedback.plan import TrainPlan
    from pctune.feedback.run import TrainRequest, train

    _check_training_arguments(args)
    if not Path(args.data).is_dir():
        raise PctuneError(f"{args.data}: no such directory")
    torch.manual_seed(args.seed)
    plan = TrainPlan(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     val_fraction=args.val_fraction, checkpoint_every=args.checkpoint_every, patience=args.patience,
                     precision=args.precision)
    train(TrainRequest(model=args.model, data=args.data, out=Path(args.out) if args.out else None, plan=plan,
                       workers=Workers(args.num_workers, args.gpus_per_worker, args.workers),
                       image_size=args.image_size, pretrained=args.pretrained, backbone_weights=args.backbone_weights,
                       feedback_weights=args.feedback_weights, device=args.device, resume=args.resume,
                       address=args.address, tracking_uri=args.tracking_uri, experiment=args.experiment))
    return 0


def _check_training_arguments(args: argparse.Namespace) -> None:
    """train-feedback's numbers, before anything is built: positive (workers: >= 0) and finite."""
    import math

    positive = {"--epochs": args.epochs, "--batch-size": args.batch_size, "--lr": args.lr,
                "--image-size": args.image_size}
    for flag, value in positive.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            hint = " (0 epochs would write untrained weights)" if flag == "--epochs" else ""
            raise PctuneError(f"{flag} must be a positive number, got {value}{hint}")
    if args.workers < 0:
        raise PctuneError(f"--workers must be >= 0, got {args.workers}")
    if args.num_workers < 1:
        raise PctuneError(f"--num-workers must be >= 1, got {args.num_workers}")
    if args.batch_size < args.num_workers:
        raise PctuneError(f"--batch-size {args.batch_size} is the global batch: it must give each of the "
                          f"{args.num_workers} workers at least one image")
    if not (math.isfinite(args.gpus_per_worker) and args.gpus_per_worker >= 0):
        raise PctuneError(f"--gpus-per-worker must be >= 0, got {args.gpus_per_worker}")
    from pctune.schema import SEED_RANGE

    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise PctuneError(f"--seed must be in {SEED_RANGE[0]}..{SEED_RANGE[1]}, got {args.seed}")


def _promote(args: argparse.Namespace) -> int:
    from pctune.pipeline import promote
    from pctune.search.cli import job_overrides
    from pctune.search.job import load_job

    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    if args.top_k is not None and args.top_k < 1:
        raise PctuneError(f"--top-k must be >= 1, got {args.top_k}")
    job = load_job(args.job, job_overrides(args))
    promote(job, args.top_k, stages)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import tomllib
    from pathlib import Path

    from pctune.evaluate.stages import evaluate_one
    from pctune.models import create_model
    from pctune.pc.hyperparameters import Hyperparameters
    from pctune.search.job import parse_assignment

    net = create_model(args.model, pretrained=args.pretrained, backbone_weights=args.backbone_weights,
                       feedback_weights=args.feedback_weights)
    if Path(args.hparams).is_file():
        try:
            table = tomllib.loads(Path(args.hparams).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise PctuneError(f"{args.hparams}: invalid TOML: {exc}") from exc
        hparams = Hyperparameters.from_mapping(table, net.num_pcoders).for_pcoders(net.num_pcoders)
    else:
        hparams = net.hyperparameters(args.hparams)
    settings = dict(parse_assignment(item) for item in args.set)
    evaluate_one(args.stage, net, hparams, args.data, Path(args.out), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
