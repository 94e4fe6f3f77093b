"""The embedded demo: scikit-learn's handwritten digits (real 8x8 images bundled with scikit-learn),
upsampled to 16x16, a small CNN trained on them, and its feedback decoders; all cached after the first
run in ``$PCTUNE_CACHE`` (default ``~/.cache/pctune``) so that later runs start at once."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from pctune.errors import PctuneError
from pctune.pc.network import PredictiveNet
from pctune.utils import Log, atomic_torch_save, atomic_write_json, print_line

CACHE_VERSION = "demo-v2"
IMAGE_SIZE = 16
NUM_TEST = 500
SPLIT_SEED = 0


def cache_root() -> Path:
    return Path(os.environ.get("PCTUNE_CACHE") or Path.home() / ".cache" / "pctune")


def digits(split: str = "test", image_size: int = IMAGE_SIZE, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """(images [N, 1, S, S] normalized by the train split's mean/std, labels [N]) of one split of
    scikit-learn's digits: a fixed, seeded split of the 1797 images, ``NUM_TEST`` held out for test.
    With ``normalize=False`` the images are pixels in [0, 1] (see :func:`digits_normalization`)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test_idx, train_idx = order[:NUM_TEST], order[NUM_TEST:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    idx = {"train": train_idx, "test": test_idx}.get(split)
    if idx is None:
        raise PctuneError(f"split must be 'train' or 'test', got {split!r}")
    x = images[idx]
    if image_size != 8:
        x = nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return ((x - mean) / std if normalize else x), labels[idx]


def digits_normalization() -> tuple[float, float]:
    """The (mean, std) that :func:`digits` normalizes pixels with (the train split's statistics)."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train = images[order[NUM_TEST:]]
    return train.mean().item(), train.std().item()


def ensure_demo_model(cache_dir: str | Path | None = None, log: Log = print_line,
                      seed: int = 0) -> dict[str, Path]:
    """Train the demo CNN and its decoders unless cached; returns the paths of the backbone state
    dict, the feedback checkpoint and the metadata."""
    folder = Path(cache_dir or cache_root()) / CACHE_VERSION
    paths = {"backbone": folder / "backbone.pt", "feedback": folder / "feedback.pt", "meta": folder / "meta.json"}
    if all(p.is_file() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    log(f"demo: training the digits CNN and its feedback decoders once (cached in {folder})")
    start = time.perf_counter()
    net, meta = _train(seed, log)
    from pctune.models.weights import save_feedback_weights

    atomic_torch_save(net.backbone.state_dict(), paths["backbone"])
    save_feedback_weights(net, paths["feedback"])
    meta["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(paths["meta"], meta)
    log(f"demo: done in {meta['seconds']}s (clean test accuracy {meta['test_accuracy']:.1%})")
    return paths


def load_demo_model(cache_dir: str | Path | None = None, log: Log = print_line) -> PredictiveNet:
    """The trained demo network (training it first if not cached)."""
    from pctune.models.registry import create_model

    paths = ensure_demo_model(cache_dir, log)
    return create_model("demo", backbone_weights=paths["backbone"], feedback_weights=paths["feedback"])


def _train(seed: int, log: Log) -> tuple[PredictiveNet, dict]:
    from pctune.models.registry import create_model
    from pctune.training import train_feedback

    threads = torch.get_num_threads()
    # One thread: these tiny convolutions gain nothing from more, and on a busy 2-core machine
    # OpenMP's spin-waiting made two threads 5-10x slower. Also keeps the result reproducible.
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        net = create_model("demo")
        x, y = digits("train")
        _train_classifier(net.backbone, x, y, seed)
        xt, yt = digits("test")
        with torch.no_grad():
            accuracy = (net(xt).argmax(1) == yt).float().mean().item()
        gen = torch.Generator().manual_seed(seed + 1)

        def batches():
            order = torch.randperm(len(x), generator=gen)
            return [x[order[i:i + 64]] for i in range(0, len(x), 64)]

        history = train_feedback(net, batches, epochs=12, lr=5e-3, device="cpu", progress=False,
                                 log=lambda _msg: None)
    finally:
        torch.set_num_threads(threads)
    return net, {"test_accuracy": accuracy, "feedback_loss": history[-1]["pcoder_losses"],
                 "train_images": len(x), "test_images": len(xt), "image_size": IMAGE_SIZE}


def _train_classifier(model: nn.Module, x: Tensor, y: Tensor, seed: int, epochs: int = 12) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.train().requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval().requires_grad_(False)


def digits_folder(image_size: int = IMAGE_SIZE, cache_dir: str | Path | None = None) -> Path:
    """The held-out digits as an ImageNet-style folder (``<class>/<index>.png``, RGB pixels), written
    once into the cache; the corruption stage reads clean images from it."""
    from PIL import Image

    folder = Path(cache_dir or cache_root()) / CACHE_VERSION / f"digits-test-{image_size}"
    done = folder / ".complete"
    if done.is_file():
        return folder
    pixels, labels = digits("test", image_size=image_size, normalize=False)
    for i, (x, y) in enumerate(zip(pixels, labels.tolist(), strict=True)):
        (folder / f"{y}").mkdir(parents=True, exist_ok=True)
        grey = (x[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(grey).convert("RGB").save(folder / f"{y}" / f"{i:04d}.png")
    done.write_text("ok")
    return folder
