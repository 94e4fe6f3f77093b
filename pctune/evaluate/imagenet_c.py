"""ImageNet-C evaluation at every timestep (``shared/spec/evaluation.md``, "ImageNet-C").

Two sources, recorded with the results:

- ``released``: the published tree ``<root>/<corruption>/<severity>/<wnid>/*.JPEG``, already
  224x224: normalization only, no second resize or crop;
- ``generated``: corrupted on the fly from a clean ImageNet-style val folder with
  ``imagecorruptions`` (seeded per image; in memory, not JPEG-85, so numbers differ slightly), by
  :func:`pctune.measure.corruptions.corrupt_image`, which the search's corruption conditions use too.

Every (corruption, severity) is one shard (plus ``clean``), run as a Ray task and checkpointed; a
shard stores per-image correctness at every timestep so that errors, CE, mCE, relative CE/mCE and
paired bootstrap intervals are all computed afterwards from the same numbers
(:mod:`pctune.evaluate.corruption_metrics`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from pctune.data.classes import ModelClasses, map_classes
from pctune.data.folders import readable_batches
from pctune.data.subsets import seeded_subset
from pctune.errors import PctuneError
from pctune.evaluate.corruption_metrics import (  # noqa: F401  (re-exported: the stage's one namespace)
    bootstrap_mce,
    ce_table,
    error_table,
    mce_table,
    plot_ce_last_vs_first,
    plot_mce,
    summarize,
)
from pctune.evaluate.shards import run_shards
from pctune.measure.corruptions import (  # noqa: F401 (re-exported: moved to pctune.measure.corruptions)
    MIN_CORRUPT_SIZE,
    CShard,
    alexnet,
    corrupt_image,
    extra_corruptions,
    hash_name,
    standard_corruptions,
)
from pctune.pc.hyperparameters import Hyperparameters
from pctune.pc.network import PredictiveNet
from pctune.utils import Log, print_line

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}


@dataclass
class Plan:
    """What to evaluate: image lists per shard, the class list, and what was skipped (and why)."""

    source: str  # released | generated
    classes: list[str]
    images: dict[str, list[tuple[str, int]]]  # shard name -> [(path, label)]
    shards: list[CShard]
    skipped: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)  # class folder -> the model's output (its label)


# -- finding the images ---------------------------------------------------------------------------
def _class_images(folder: Path, index: dict[str, int]) -> tuple[list[tuple[str, int]], list[str], list[str]]:
    """(images with labels, class folders found, notes) of one ``<wnid>/*`` folder whose class folders are
    among ``index`` (class folder -> the model's output, :func:`pctune.data.classes.map_classes`)."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    notes = []
    unknown = [c for c in found if c not in index]
    if unknown:
        raise PctuneError(f"{folder}: class folder {unknown[0]!r} is not in the model's class list")
    images = []
    for wnid in found:
        files = sorted(p for p in (folder / wnid).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        images.extend((str(p), index[wnid]) for p in files)
    if len(found) < len(index):
        missing = [c for c in index if c not in set(found)]
        notes.append(f"{folder}: {len(missing)} of {len(index)} classes missing (e.g. {missing[0]})")
    return images, found, notes


def _class_index(classes: list[str], num_classes: int, where: Path, model_classes: ModelClasses | None
                 ) -> dict[str, int]:
    """The plan's class folders labelled by the model's classes (without a class list given, the older
    rule: sorted, as many as ``num_classes``)."""
    return map_classes(classes, model_classes or ModelClasses(count=num_classes), str(where))


def plan_released(root: str | Path, corruptions: Sequence[str], severities: Sequence[int],
                  clean: str | Path | None, num_classes: int, classes: list[str] | None = None,
                  model_classes: ModelClasses | None = None) -> Plan:
    """Scan the released layout; missing corruptions/severities/classes become listed skips. The class
    folders are labelled by ``model_classes`` (a wnid's true index) when given."""
    root = Path(root)
    if not root.is_dir():
        raise PctuneError(f"{root}: no such directory")
    if not any((root / c).is_dir() for c in corruptions):
        raise PctuneError(f"{root}: none of the corruption folders ({corruptions[0]}, ...) exist; "
                          "expected <root>/<corruption>/<severity>/<wnid>/<image>")
    if classes is None:
        classes = sorted({p.name for c in corruptions for s in severities
                          for p in (root / c / str(s)).glob("*") if p.is_dir()})
    index = _class_index(classes, num_classes, root, model_classes)
    plan = Plan("released", sorted(index), {}, [], index=index)
    for c in corruptions:
        for s in severities:
            folder = root / c / str(s)
            if not folder.is_dir():
                plan.skipped.append(f"{c}/{s}: missing ({folder})")
                continue
            images, _, notes = _class_images(folder, index)
            plan.skipped.extend(notes)
            if not images:
                plan.skipped.append(f"{c}/{s}: no images")
                continue
            shard = CShard(c, s)
            plan.shards.append(shard)
            plan.images[shard.name] = images
    if clean is not None:
        _add_clean(plan, Path(clean))
    return plan


def plan_generated(clean: str | Path, corruptions: Sequence[str], severities: Sequence[int], num_classes: int,
                   num_images: int | None = None, seed: int = 0, model_classes: ModelClasses | None = None) -> Plan:
    """Every (corruption, severity) of the clean val folder, corrupted on the fly."""
    clean = Path(clean)
    if not clean.is_dir():
        raise PctuneError(f"{clean}: no such directory")
    index = _class_index(sorted(p.name for p in clean.iterdir() if p.is_dir()), num_classes, clean, model_classes)
    images, classes, _ = _class_images(clean, index)
    if not images:
        raise PctuneError(f"{clean}: no images")
    images = [images[i] for i in seeded_subset(len(images), num_images, seed)]
    plan = Plan("generated", classes, {}, [], index=index)
    unknown = [c for c in corruptions if c not in alexnet()["errors"]]
    if unknown:
        raise PctuneError(f"unknown corruption {unknown[0]!r}")
    for c in corruptions:
        for s in severities:
            shard = CShard(c, s)
            plan.shards.append(shard)
            plan.images[shard.name] = images
    plan.shards.append(CShard("clean", 0))
    plan.images["clean"] = images
    return plan


def _add_clean(plan: Plan, clean: Path) -> None:
    images, _, notes = _class_images(clean, plan.index)
    plan.skipped.extend(notes)
    plan.shards.append(CShard("clean", 0))
    plan.images["clean"] = images


# -- evaluating one shard -------------------------------------------------------------------------
@dataclass
class CorruptionPayload:
    """What every ImageNet-C shard needs (sent once through the Ray object store): the network and its
    configuration, the plan, and how to decode the images."""

    net: PredictiveNet
    hparams: Hyperparameters
    timesteps: int
    plan: Plan
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    batch_size: int = 64
    workers: int = 2
    seed: int = 0
    channels: int = 3  # 1: corrupt in RGB, then evaluate the grey image
    crop: bool = True  # clean images: resize to 256/224 of the size and centre-crop (ImageNet's recipe)


class _ShardImages(torch.utils.data.Dataset):
    """Decodes (and for the generated source, corrupts) one shard's images; unreadable ones are
    returned as flagged placeholders so they can be listed, not counted."""

    def __init__(self, payload: CorruptionPayload, shard: CShard) -> None:
        self.items = payload.plan.images[shard.name]
        self.shard = shard
        self.generated = payload.plan.source == "generated" or shard.corruption == "clean"
        self.size = payload.image_size
        self.seed = payload.seed
        self.normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(payload.mean, payload.std)])
        self.channels = payload.channels
        self.prepare = transforms.Compose([transforms.Resize(round(self.size * 256 / 224)),
                                           transforms.CenterCrop(self.size)]) if payload.crop else \
            transforms.Resize((self.size, self.size))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if self.generated:
                    img = self.prepare(img)
                    if self.shard.corruption != "clean":
                        img = corrupt_image(img, self.shard, self.seed, i)
                elif img.size != (self.size, self.size):
                    img = transforms.CenterCrop(self.size)(img)
                if self.channels == 1:
                    img = img.convert("L")
                return self.normalize(img), label, True
        except (OSError, ValueError):
            return torch.zeros(self.channels, self.size, self.size), label, False


def evaluate_shard(payload: CorruptionPayload, shard: CShard) -> dict:
    """Per-image correctness at every timestep for one shard."""
    start = time.perf_counter()
    device = next(payload.net.parameters()).device
    loader = torch.utils.data.DataLoader(_ShardImages(payload, shard), batch_size=payload.batch_size,
                                         num_workers=payload.workers, pin_memory=device.type == "cuda")
    correct, skipped = [], []
    paths = [path for path, _label in payload.plan.images[shard.name]]
    for x, y, unreadable in readable_batches(loader, paths):
        skipped.extend(unreadable)
        if len(y):
            logits = payload.net.run(x.to(device, non_blocking=True), payload.timesteps, payload.hparams)
            correct.append((logits.argmax(-1).cpu() == y).to(torch.uint8))
    matrix = torch.cat(correct, dim=1) if correct else torch.zeros(payload.timesteps + 1, 0, dtype=torch.uint8)
    return {"corruption": shard.corruption, "severity": shard.severity, "correct": matrix.tolist(),
            "images": int(matrix.shape[1]), "skipped": skipped, "seconds": time.perf_counter() - start,
            "source": payload.plan.source}


def run(payload: CorruptionPayload, out_dir: Path, use_ray: bool = True, num_gpus: float = 0.0,
        log: Log = print_line) -> list[dict]:
    for note in payload.plan.skipped:
        log(f"imagenet-c: skipped: {note}")
    return run_shards(evaluate_shard, payload, payload.plan.shards, out_dir, use_ray=use_ray, num_gpus=num_gpus,
                      log=log, what="imagenet-c")
