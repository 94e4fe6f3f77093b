"""The wheel: it ships the jobs and search spaces (and its other data files), and ``pctune search demo``
runs from an installed wheel in an empty directory (no checkout, no ./jobs)."""

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["pctune/jobs/demo.toml", "pctune/jobs/peffnetb0.toml", "pctune/jobs/pvgg16.toml",
           "pctune/search_spaces/demo.toml", "pctune/search_spaces/peffnetb0.toml",
           "pctune/search_spaces/pvgg16.toml", "pctune/measure/alexnet_errors.toml"]


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel of this checkout, built from a copy (the checkout gets no build/ or egg-info)."""
    pytest.importorskip("setuptools", minversion="77")  # the build backend, installed with torch's dependencies
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "pctune", src / "pctune", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-cache-dir", "--disable-pip-version-check", "--wheel-dir", str(dist), str(src)],
                   check=True, timeout=300)
    (wheel,) = dist.glob("pctune-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv outside the checkout whose dependencies are this interpreter's site-packages, without
    pctune: a plain path line in a .pth file adds that folder but runs none of its .pth files (the
    editable install's finder among them). Returns (python, its site-packages)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True, timeout=60).stdout.strip())
    here = sysconfig.get_paths()
    lines = dict.fromkeys([here["purelib"], here["platlib"]])
    (purelib / "dependencies.pth").write_text("".join(f"{line}\n" for line in lines))
    return python, purelib


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env["PCTUNE_CACHE"] = os.environ.get("PCTUNE_CACHE") or str(Path.home() / ".cache" / "pctune")  # the demo model
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_the_wheel_ships_the_jobs_and_search_spaces():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"pctune" = ["jobs/*.toml", "search_spaces/*.toml"]' in text
    assert '"pctune.measure" = ["*.toml"]' in text  # ImageNet-C's corruptions and AlexNet's errors
    assert all((ROOT / name).is_file() for name in SHIPPED)


@pytest.mark.slow
def test_pctune_search_demo_runs_from_the_installed_wheel(tmp_path):
    start = time.perf_counter()
    wheel = _build_wheel(tmp_path)
    assert set(SHIPPED) <= set(zipfile.ZipFile(wheel).namelist())
    python, purelib = _fresh_venv(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    env = _env(tmp_path)

    def run(*args, **kwargs):
        return subprocess.run([str(a) for a in args], cwd=work, env=env, capture_output=True, text=True, **kwargs)

    # the checkout's pctune is not importable in the fresh venv, its dependencies are
    missing = run(python, "-c", "import pctune", timeout=120)
    assert missing.returncode != 0 and "No module named 'pctune'" in missing.stderr, missing.stderr

    installed = run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed", "--no-index",
                    "--disable-pip-version-check", "--no-warn-script-location", wheel, timeout=300)
    assert installed.returncode == 0, installed.stderr
    where = run(python, "-c", "import pctune; print(pctune.__file__)", timeout=120)
    assert Path(where.stdout.strip()) == purelib / "pctune" / "__init__.py", where.stderr

    result = run(python.parent / "pctune", "search", "demo", "--num-samples", "2", "--num-images", "60",
                 timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = work / "pctune_runs" / "demo"
    assert run_dir.is_dir() and (run_dir / "best.toml").is_file() and (run_dir / "leaderboard.csv").is_file()
    print(f"wheel test: {time.perf_counter() - start:.0f}s")
