"""requirements/lock.txt and pyproject.toml agree (scripts/check_lock.py, which `make test` runs first), and
the checker fails on a lock that disagrees. No network, no installs."""

import importlib.util
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_lock", ROOT / "scripts" / "check_lock.py")
check_lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_lock)

PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements" / "lock.txt"


def test_the_lock_meets_pyproject():
    pins, problems = check_lock.read_lock(LOCK)
    assert problems == []
    assert check_lock.lock_problems(check_lock.requirements(PYPROJECT), pins) == []
    assert "pctune" not in pins and "pip" not in pins


def test_optuna_4_is_excluded():
    """Trial.set_constraint and FrozenTrial.constraints, which pctune uses, are Optuna 5's."""
    (optuna,) = [r for r in check_lock.requirements(PYPROJECT) if r.name == "optuna"]
    assert "4.5.0" not in optuna.specifier and "4.9.0" not in optuna.specifier
    assert check_lock.read_lock(LOCK)[0]["optuna"] in optuna.specifier


def test_a_disagreeing_lock_fails(tmp_path):
    lines = [line for line in LOCK.read_text().splitlines() if not line.startswith("captum==")]
    lines = [("optuna==4.5.0" if line.startswith("optuna==") else line) for line in lines]
    bad = tmp_path / "lock.txt"
    bad.write_text("\n".join([*lines, "-e /somewhere/pctune", "torch @ file:///wheels/torch.whl", ""]))
    pins, problems = check_lock.read_lock(bad)
    problems += check_lock.lock_problems(check_lock.requirements(PYPROJECT), pins)
    assert problems == [
        f"lock.txt:{len(lines) + 1}: not a name==version pin: -e /somewhere/pctune",
        f"lock.txt:{len(lines) + 2}: not a name==version pin: torch @ file:///wheels/torch.whl",
        "pyproject requires optuna>=5.1.0 but the lock pins optuna==4.5.0",
        "pyproject requires captum>=0.9.0 but the lock has no captum",
    ]
    assert check_lock.main(["--lock", str(bad), "--no-installed"]) == 1


def test_installed_versions_must_equal_the_lock():
    pins = {"optuna": Version("5.1.0"), "numpy": Version("2.4.6"), "torch": Version("2.14.1")}
    have = {"optuna": Version("5.1.0"), "numpy": Version("2.4.5"), "torch": Version("2.14.1+cpu"),
            "extra-pkg": Version("1.0"), "pip": Version("26.3"), "pctune": Version("0.1.0")}
    assert check_lock.installed_problems(pins, have) == [
        "extra-pkg==1.0 is installed but not in the lock",
        "numpy==2.4.5 is installed but the lock pins numpy==2.4.6",
        "torch==2.14.1+cpu is installed but the lock pins torch==2.14.1",
    ]
    assert check_lock.installed_problems(pins, {}) == [
        "the lock pins numpy==2.4.6 but it is not installed",
        "the lock pins optuna==5.1.0 but it is not installed",
        "the lock pins torch==2.14.1 but it is not installed",
    ]
