"""Promotion: the top-k configurations of a finished search through the evaluation stages.

``pctune promote JOB`` (and a search whose job lists ``[promotion] stages``) evaluates the k best
configurations: ``imagenet-c`` (CE/mCE at every timestep), ``adversarial`` (targeted attacks at every
timestep) and ``noise`` (the Gaussian-noise sweep and denoising analyses). The feedforward baseline is
timestep 0 of every configuration. Results go to ``<run dir>/promotion/<config>/<stage>/`` (every shard
checkpointed: an interrupted promotion resumes) and to one nested MLflow run per configuration under
the search's run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pctune.errors import PctuneError
from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet

Log = Callable[[str], None]
DEFAULT_SIGMAS = [0.0, 0.25, 0.5, 0.75, 1.0]


@dataclass
class Candidate:
    name: str  # e.g. "rank1"
    trial: str
    hparams: Hyperparameters
    mean_ce: float


@dataclass
class Images:
    """Clean evaluation images as pixels in [0, 1], their labels, the model's normalization, and an
    ImageNet-style folder of them (for the corruption stage)."""

    pixels: torch.Tensor
    labels: torch.Tensor
    mean: list[float]
    std: list[float]
    folder: Path
    crop: bool


def candidates(job, top_k: int) -> list[Candidate]:
    """The k best non-diverged trials (or the per-pcoder combination) of the job's search."""
    from pctune.search.results import leaderboard, row_hparams

    frame = leaderboard(job)
    found = frame[(frame["kind"] != "reference") & ~frame["diverged"]].head(top_k)
    if found.empty:
        raise PctuneError(f"no finished trial in {job.run_dir} to promote")
    return [Candidate(f"rank{i}", str(row.get("trial_id", row["name"])), row_hparams(row), float(row["mean_ce"]))
            for i, (_, row) in enumerate(found.iterrows(), start=1)]


def load_images(source: str, path: str | None, input_size: tuple[int, int, int], num_images: int | None = None,
                seed: int = 0, workers: int = 0) -> Images:
    """Clean images of ``source`` ("digits" or an ImageNet-style val folder at ``path``)."""
    if source == "digits":
        from pctune.data.demo import digits, digits_folder, digits_normalization

        pixels, labels = digits("test", image_size=input_size[-1], normalize=False)
        mean, std = digits_normalization()
        return _subset(Images(pixels, labels, [mean], [std], digits_folder(input_size[-1]), crop=False),
                       num_images, seed)
    from torchvision import datasets, transforms

    from pctune.data.folders import IMAGENET_MEAN, IMAGENET_STD

    size = input_size[-1]
    if not path or not Path(path).is_dir():
        raise PctuneError(f"{path}: no such image folder")
    dataset = datasets.ImageFolder(path, transform=transforms.Compose([
        transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size), transforms.ToTensor()]))
    count = min(num_images or len(dataset), len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order.tolist()), batch_size=64,
                                         num_workers=workers)
    xs, ys = zip(*loader, strict=True)
    return Images(torch.cat(xs), torch.cat(ys), list(IMAGENET_MEAN), list(IMAGENET_STD), Path(path), crop=True)


def _subset(images: Images, num_images: int | None, seed: int) -> Images:
    if num_images is None or num_images >= len(images.labels):
        return images
    order = torch.randperm(len(images.labels), generator=torch.Generator().manual_seed(seed))[:num_images]
    return Images(images.pixels[order], images.labels[order], images.mean, images.std, images.folder, images.crop)


# -- stages -----------------------------------------------------------------------------------------
def stage_noise(net: PredictiveNet, cand: Candidate, images: Images, settings: dict, out: Path) -> dict:
    from pctune.evaluate.noise import noise_sweep, plot_accuracy_per_sigma

    timesteps = int(settings.get("timesteps", 10))
    done = out / "noise_sweep.csv"
    if done.is_file():  # resume: the sweep finished before
        table = pd.read_csv(done)
        metrics = [(f"noise_accuracy_sigma{r.sigma:g}", r.accuracy, int(r.timestep)) for r in table.itertuples()]
        return {"table": table, "metrics": metrics,
                "artifacts": [done, plot_accuracy_per_sigma(table, out / "accuracy_per_sigma.png")]}
    norm = (images.pixels - torch.tensor(images.mean).view(1, -1, 1, 1)) / torch.tensor(images.std).view(1, -1, 1, 1)
    table = noise_sweep(net, cand.hparams, norm, images.labels, timesteps, list(settings.get("sigmas", DEFAULT_SIGMAS)),
                        seed=int(settings.get("seed", 0)))
    table.to_csv(out / "noise_sweep.csv", index=False)
    metrics = [(f"noise_accuracy_sigma{r.sigma:g}", r.accuracy, int(r.timestep)) for r in table.itertuples()]
    return {"table": table, "metrics": metrics,
            "artifacts": [out / "noise_sweep.csv", plot_accuracy_per_sigma(table, out / "accuracy_per_sigma.png")]}


def stage_imagenet_c(net: PredictiveNet, cand: Candidate, images: Images, settings: dict, out: Path, log: Log) -> dict:
    from pctune.evaluate import imagenet_c as ic

    timesteps = int(settings.get("timesteps", 10))
    corruptions = list(settings.get("corruptions", ic.standard_corruptions() + ic.extra_corruptions()))
    severities = list(settings.get("severities", [1, 2, 3, 4, 5]))
    num_classes = int(net(torch.zeros(1, *net.input_size)).shape[-1])
    if settings.get("source", "generated") == "released":
        if "path" not in settings:
            raise PctuneError("promotion.imagenet-c.path: the released ImageNet-C folder is required")
        plan = ic.plan_released(settings["path"], corruptions, severities, settings.get("clean", images.folder),
                                num_classes)
    else:
        plan = ic.plan_generated(settings.get("clean", images.folder), corruptions, severities, num_classes,
                                 settings.get("num_images"), int(settings.get("seed", 0)))
    payload = ic.Payload(net, cand.hparams, timesteps, plan, net.input_size[-1], images.mean, images.std,
                         batch_size=int(settings.get("batch_size", 100)), workers=int(settings.get("workers", 0)),
                         seed=int(settings.get("seed", 0)), channels=net.input_size[0], crop=images.crop)
    results = ic.run(payload, out, use_ray=bool(settings.get("use_ray", True)), log=log)
    tables = ic.summarize(results, resamples=int(settings.get("resamples", 1000)))
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    mce = tables["mce"]
    metrics = [(key, float(getattr(r, key)), int(r.timestep)) for r in mce.itertuples()
               for key in ("mce", "relative_mce", "mce_extra") if pd.notna(getattr(r, key))]
    artifacts = [out / f"{name}.csv" for name in tables]
    if not tables["ce"].empty:
        artifacts.append(ic.plot_ce_last_vs_first(tables["ce"], out / "ce_last_vs_t0.png"))
    if not mce.empty and mce.mce.notna().any():
        artifacts.append(ic.plot_mce(mce, out / "mce_over_timesteps.png"))
    (out / "source.json").write_text(json.dumps({"source": plan.source, "skipped": plan.skipped}, indent=2))
    return {"table": mce, "metrics": metrics, "artifacts": [*artifacts, out / "source.json"]}


def stage_adversarial(net: PredictiveNet, cand: Candidate, images: Images, settings: dict, out: Path,
                      log: Log) -> dict:
    from pctune.evaluate import adversarial as adv

    timesteps = int(settings.get("timesteps", 10))
    seed = int(settings.get("seed", 0))
    attacks = [adv.AttackSpec(**a) for a in settings["attacks"]] if "attacks" in settings else adv.default_attacks()
    idx, targets = adv.select_images(net, cand.hparams, images.pixels, images.labels, images.mean, images.std,
                                     timesteps, int(settings.get("num_images", 1000)), seed)
    setup = adv.Setup(net, cand.hparams, images.pixels[idx], images.labels[idx], targets, images.pixels,
                      images.mean, images.std, timesteps, attacks)
    results = adv.run_all(setup, out, chunk=int(settings.get("chunk", 50)), use_ray=bool(settings.get("use_ray", True)),
                          log=log, seed=seed)
    table = adv.success_table(results, timesteps, resamples=int(settings.get("resamples", 1000)), seed=seed)
    cost = adv.cost_table(results)
    table.to_csv(out / "success.csv", index=False)
    cost.to_csv(out / "cost.csv", index=False)
    metrics = [(f"adv_{r.attack}_{r.mode}_eps{r.epsilon:g}", float(r.success_rate), int(r.timestep))
               for r in table.itertuples()]
    return {"table": table, "metrics": metrics, "artifacts": [out / "success.csv", out / "cost.csv",
                                                               adv.plot_success(table, out / "success.png")]}


def run_stage(stage: str, net: PredictiveNet, cand: Candidate, images: Images, settings: dict, out: Path,
              log: Log) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if stage == "noise":
        return stage_noise(net, cand, images, settings, out)
    if stage == "imagenet-c":
        return stage_imagenet_c(net, cand, images, settings, out, log)
    if stage == "adversarial":
        return stage_adversarial(net, cand, images, settings, out, log)
    raise PctuneError(f"unknown stage {stage!r} (imagenet-c, adversarial or noise)")


# -- the commands -----------------------------------------------------------------------------------
def evaluate(stage: str, net: PredictiveNet, hparams: Hyperparameters, data: str, out: Path, settings: dict,
             log: Log = print) -> dict:
    """``pctune evaluate STAGE``: one configuration through one stage, without a search."""
    source = "digits" if data == "digits" else "imagenet-val"
    images = load_images(source, None if data == "digits" else data, net.input_size,
                         settings.get("num_images") if stage == "noise" else None, int(settings.get("seed", 0)))
    cand = Candidate("evaluate", "-", hparams, float("nan"))
    result = run_stage(stage, net, cand, images, settings, out, log)
    log(f"{stage}:\n{_brief(stage, result['table'])}\nwritten: {out}")
    return result



def promote(job, top_k: int | None = None, stages: list[str] | None = None, log: Log = print) -> dict[str, Any]:
    from pctune.search.driver import build_model

    stages = list(stages if stages is not None else job.promotion.stages)
    if not stages:
        raise PctuneError(f"{job.source}: no promotion stages (set [promotion] stages or pass --stages)")
    chosen = candidates(job, top_k or job.promotion.top_k)
    _, net = build_model(job, log=log)
    settings = job.promotion.settings
    root = job.run_dir / "promotion"
    summary: dict[str, Any] = {}
    for cand in chosen:
        log(f"promotion: {cand.name} (trial {cand.trial}, mean_ce {cand.mean_ce:.4f}): {', '.join(stages)}")
        outputs = {}
        for stage in stages:
            cfg = settings.get(stage, {})
            images = load_images(job.data.source, job.data.path, net.input_size,
                                 cfg.get("num_images") if stage == "noise" else None, int(cfg.get("seed", 0)),
                                 job.data.workers)
            outputs[stage] = run_stage(stage, net, cand, images, cfg, root / cand.name / stage, log)
            log(f"promotion: {cand.name} {stage}:\n{_brief(stage, outputs[stage]['table'])}")
        (root / cand.name / "hparams.toml").write_text(cand.hparams.to_toml())
        summary[cand.name] = {"trial": cand.trial, "mean_ce": cand.mean_ce, "stages": stages,
                              "dir": str(root / cand.name)}
        _track(job, cand, outputs, log)
    return summary


def _brief(stage: str, table: pd.DataFrame) -> str:
    if stage == "imagenet-c":
        cols = [c for c in ("timestep", "mce", "mce_ci_low", "mce_ci_high", "relative_mce", "mce_extra") if c in table]
        return table[cols].to_string(index=False, float_format="{:.4f}".format)
    if stage == "adversarial":
        pivot = table.pivot_table(index=["attack", "mode", "epsilon"], columns="timestep", values="success_rate")
        return pivot.to_string(float_format="{:.3f}".format)
    pivot = table.pivot_table(index="sigma", columns="timestep", values="accuracy")
    return pivot.to_string(float_format="{:.3f}".format)


def _track(job, cand: Candidate, outputs: dict, log: Log) -> None:
    """One nested MLflow run per promoted configuration (a failure is a warning)."""
    try:
        from pctune.tracking.promotion import log_promotion

        log_promotion(job, cand, outputs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log(f"warning: MLflow logging of the promotion failed ({first[:200]}); results are in {job.run_dir}")
