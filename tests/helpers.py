"""Helpers shared by the test modules (import them with ``from helpers import ...``; test files do not
import each other)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def demo_job(tmp_path: Path, name: str = "demo", extra: str = "") -> Path:
    """A copy of jobs/demo.toml in ``tmp_path`` (its space given by absolute path), ``extra`` TOML put
    before its tables (top-level keys such as ``name = "..."``)."""
    path = tmp_path / f"{name}job.toml"
    text = (ROOT / "jobs" / "demo.toml").read_text().replace('space = "demo"', f'space = "{ROOT}/search_spaces/demo.toml"')
    path.write_text(extra + "\n" + text if extra else text)
    return path


def image_folder(root: Path, classes: int | list[str], per_class: int = 3, corrupt: int = 0, size: int = 20) -> Path:
    """An ImageNet-style folder of random PNGs: ``classes`` folders (a count: class00, class01, ...; or
    their names), ``per_class`` images each, ``corrupt`` undecodable files in the first."""
    import numpy as np
    from PIL import Image

    names = [f"class{c:02d}" for c in range(classes)] if isinstance(classes, int) else list(classes)
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.random.default_rng(c * 100 + i).integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    for i in range(corrupt):
        (root / names[0] / f"broken{i}.png").write_bytes(b"not a png at all")
    return root


#: a small RGB model spec (the demo CNN's architecture with 3 input channels): train-feedback and folders
TINY_RGB_SPEC = """name = "tiny-rgb"
backbone = "pctune/demo_cnn"
backbone_kwargs = { in_channels = 3, num_classes = 3 }
input_size = [3, 32, 32]
[[pcoders]]
module = "features.1"
[[pcoders]]
module = "features.4"
[[pcoders]]
module = "features.7"
"""


def kill_after_trials(driver: subprocess.Popen, run_dir, trials: int, stage: str = "joint", timeout: float = 240) -> None:
    """SIGKILL the process group of ``driver`` (started with ``start_new_session=True``) once ``trials``
    trials of ``stage`` have finished in ``run_dir`` (a :class:`pctune.search.rundir.RunDir`)."""
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and sum(t.finished for t in run_dir.trials(stage)) < trials:
            assert driver.poll() is None, "the driver ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
