"""The promotion stages, each taking one configuration from its typed settings into an output folder:
``noise`` (the Gaussian-noise sweep and denoising analyses), ``imagenet-c`` (CE/mCE at every timestep),
``adversarial`` (targeted attacks at every timestep) and ``explain`` (Grad-CAM IoU with the objects'
masks at every timestep). The feedforward baseline is timestep 0 of every configuration. What the stages
measure with (clean images, object masks, Grad-CAM IoU, corruptions) is :mod:`pctune.measure`, which the
search's objectives share.

The stage names live in one table, :data:`pctune.evaluate.settings.STAGE_SETTINGS` (name -> typed
settings); :func:`run_stage` runs the stage its settings' type names, on the clean images of
:func:`stage_images`. :func:`pctune.pipeline.promote` calls them for the best configurations of a search,
:func:`evaluate_one` (``pctune evaluate STAGE``) for one configuration. Every stage writes its tables and
plots into its output folder; ``imagenet-c``, ``adversarial`` and ``explain`` also one checkpoint file per
shard, and ``noise`` reads its finished table back, so running a stage again skips what it finished before.
:func:`masked_images` gives the ``cam_iou`` search objective its images too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pctune.data.sources import data_source, source_of
from pctune.evaluate.settings import (
    STAGE_SETTINGS,
    AdversarialSettings,
    ExplainSettings,
    ImagenetCSettings,
    NoiseSettings,
    parse_stage_settings,
)
from pctune.measure.images import Images, clean_images
from pctune.measure.masks import masked_images  # re-exported too: moved to pctune.measure.masks
from pctune.models.registry import model_classes
from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet
from pctune.utils import Log, print_line

Metrics = list[tuple[str, float, int]]  # (name, value, step = timestep)


@dataclass
class StageResult:
    table: pd.DataFrame
    metrics: Metrics
    artifacts: list[Path] = field(default_factory=list)
    brief: str = ""  # the few lines printed after the stage


def run_noise(net: PredictiveNet, hparams: Hyperparameters, images: Images, settings: NoiseSettings, out: Path,
              log: Log) -> StageResult:
    from pctune.evaluate.noise import noise_sweep, plot_accuracy_per_sigma

    done = out / "noise_sweep.csv"
    if done.is_file():  # resume: the sweep finished before
        table = pd.read_csv(done)
    else:
        table = noise_sweep(net, hparams, images.normalized(), images.labels, settings.timesteps,
                            list(settings.sigmas), seed=settings.seed)
        table.to_csv(done, index=False)
    metrics = [(f"noise_accuracy_sigma{r.sigma:g}", r.accuracy, int(r.timestep)) for r in table.itertuples()]
    brief = table.pivot_table(index="sigma", columns="timestep", values="accuracy").to_string(
        float_format="{:.3f}".format)
    return StageResult(table, metrics, [done, plot_accuracy_per_sigma(table, out / "accuracy_per_sigma.png")], brief)


def _corruption_plan(net: PredictiveNet, images: Images, settings: ImagenetCSettings):
    from pctune.evaluate import imagenet_c as ic

    corruptions = settings.corruptions or ic.standard_corruptions() + ic.extra_corruptions()
    classes = model_classes(net)
    clean = settings.clean or images.folder
    if settings.source == "released":
        return ic.plan_released(settings.path, corruptions, settings.severities, clean, classes.count,
                                model_classes=classes)
    return ic.plan_generated(clean, corruptions, settings.severities, classes.count, settings.num_images,
                             settings.seed, model_classes=classes)


def run_imagenet_c(net: PredictiveNet, hparams: Hyperparameters, images: Images, settings: ImagenetCSettings,
                   out: Path, log: Log) -> StageResult:
    from pctune.evaluate import imagenet_c as ic

    plan = _corruption_plan(net, images, settings)
    payload = ic.CorruptionPayload(net, hparams, settings.timesteps, plan, net.input_size[-1], images.mean, images.std,
                         batch_size=settings.batch_size, workers=settings.workers, seed=settings.seed,
                         channels=net.input_size[0], crop=images.crop)
    tables = ic.summarize(ic.run(payload, out, use_ray=settings.use_ray, log=log), resamples=settings.resamples)
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
    cols = [c for c in ("timestep", "mce", "mce_ci_low", "mce_ci_high", "relative_mce", "mce_extra") if c in mce]
    return StageResult(mce, metrics, [*artifacts, out / "source.json"],
                       mce[cols].to_string(index=False, float_format="{:.4f}".format))


def run_adversarial(net: PredictiveNet, hparams: Hyperparameters, images: Images, settings: AdversarialSettings,
                    out: Path, log: Log) -> StageResult:
    from pctune.evaluate import adversarial as adv

    attacks = settings.attacks if settings.attacks is not None else adv.default_attacks()
    idx, targets = adv.select_images(net, hparams, images.pixels, images.labels, images.mean, images.std,
                                     settings.timesteps, settings.num_images, settings.seed)
    setup = adv.AttackPayload(net, hparams, images.pixels[idx], images.labels[idx], targets, images.pixels,
                      images.mean, images.std, settings.timesteps, attacks)
    results = adv.run_all(setup, out, chunk=settings.chunk, use_ray=settings.use_ray, log=log, seed=settings.seed)
    table = adv.success_table(results, settings.timesteps, resamples=settings.resamples, seed=settings.seed)
    table.to_csv(out / "success.csv", index=False)
    adv.cost_table(results).to_csv(out / "cost.csv", index=False)
    metrics = [(f"adv_{r.attack}_{r.mode}_eps{r.epsilon:g}", float(r.success_rate), int(r.timestep))
               for r in table.itertuples()]
    brief = table.pivot_table(index=["attack", "mode", "epsilon"], columns="timestep",
                              values="success_rate").to_string(float_format="{:.3f}".format)
    return StageResult(table, metrics, [out / "success.csv", out / "cost.csv",
                                        adv.plot_success(table, out / "success.png")], brief)


def run_explain(net: PredictiveNet, hparams: Hyperparameters, images: Images, settings: ExplainSettings,
                out: Path, log: Log) -> StageResult:
    from pctune.evaluate import explain as ex
    from pctune.evaluate.explain_plots import plot_iou, plot_overlays, seeded_picks

    payload = ex.ExplainPayload(net, hparams, *masked_images(images, settings, net, log), images.mean, images.std,
                                settings.timesteps, settings.cam_threshold, settings.grad_mode, settings.seed)
    results = ex.run_all(payload, settings.sigmas, out, chunk=settings.chunk, use_ray=settings.use_ray, log=log)
    table = ex.iou_table(results, resamples=settings.resamples, seed=settings.seed)
    table.to_csv(out / "iou.csv", index=False)
    cost = ex.cost_per_image_timestep(results)
    (out / "cost.json").write_text(json.dumps({"seconds_per_image_per_timestep": cost}, indent=2))
    names = {"iou": "cam_iou", "ci_low": "cam_iou_ci_low", "ci_high": "cam_iou_ci_high", "relative_t0": "cam_iou_rel"}
    metrics = [(f"{name}_sigma{r.sigma:g}", float(getattr(r, col)), int(r.timestep)) for r in table.itertuples()
               for col, name in names.items() if pd.notna(getattr(r, col))]
    artifacts = [out / "iou.csv", out / "cost.json", plot_iou(table, out / "iou_over_timesteps.png")]
    picks = seeded_picks(settings.overlays, len(payload.labels), settings.seed)
    if picks:
        artifacts += [plot_overlays(payload, picks, s, out / f"overlays_sigma{s:g}.png") for s in settings.sigmas]
    brief = table.pivot_table(index="sigma", columns="timestep", values="iou").to_string(float_format="{:.3f}".format)
    return StageResult(table, metrics, artifacts, f"{brief}\nGrad-CAM: {cost * 1000:.1f} ms per image per timestep")


_RUNNERS = {NoiseSettings: run_noise, ImagenetCSettings: run_imagenet_c, AdversarialSettings: run_adversarial,
            ExplainSettings: run_explain}


def run_stage(settings, net: PredictiveNet, hparams: Hyperparameters, images: Images, out: Path,
              log: Log = print_line) -> StageResult:
    """Run the stage that ``settings`` configures (one of :data:`STAGE_SETTINGS`' types) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    return _RUNNERS[type(settings)](net, hparams, images, settings, out, log)


def stage_images(stage: str, settings, source: str, path: str | None, net: PredictiveNet, workers: int = 0) -> Images:
    """The clean images a stage starts from: the noise sweep and explain draw their seeded subset here; the other
    stages take every image (ImageNet-C subsets its own plan, the attacks choose their own images)."""
    num_images = settings.num_images if stage in ("noise", "explain") else None
    classes = None if data_source(source).own_classes else model_classes(net)
    return clean_images(source, path, net.input_size, num_images, settings.seed, workers, classes)


def evaluate_one(stage: str, net: PredictiveNet, hparams: Hyperparameters, data: str, out: Path,
                 settings: dict, log: Log = print_line) -> StageResult:
    """``pctune evaluate STAGE``: one configuration through one stage, without a search. ``data`` is
    an ImageNet-style val folder or "digits"; ``settings`` the stage's settings as ``--set`` gave them."""
    typed = parse_stage_settings(stage, settings, "--set", name=stage)
    found, path = source_of(data)
    source = found.name
    result = run_stage(typed, net, hparams, stage_images(stage, typed, source, path, net), out, log)
    log(f"{stage}:\n{result.brief}\nwritten: {out}")
    return result


__all__ = ["STAGE_SETTINGS", "StageResult", "evaluate_one", "masked_images", "run_stage", "stage_images"]
