"""Check that requirements/lock.txt and pyproject.toml agree, and that this environment has exactly the
locked versions. One line per problem, exit status 1 if any.

- every requirement of pyproject's ``dependencies`` and ``test`` extra whose marker holds for this
  interpreter is in the lock, at a version it allows;
- every lock line is ``name==version`` (no editable or local-path entries);
- the packages installed here (but pip and pctune) are exactly the locked ones, at the locked versions.

Usage: python scripts/check_lock.py [--pyproject PATH] [--lock PATH] [--no-installed]
"""

import argparse
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
NOT_LOCKED = {"pip", "pctune"}  # the installer (make install upgrades it) and the project itself


def requirements(pyproject: Path) -> list[Requirement]:
    """pyproject's dependencies and test extra whose markers hold for this interpreter."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": "test"})]


def read_lock(lock: Path) -> tuple[dict[str, Version], list[str]]:
    """The lock's pins by canonical name, and a problem line for each line that is not ``name==version``."""
    pins, problems = {}, []
    for number, raw in enumerate(lock.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        try:
            if not sep or not name.strip() or "@" in line or line.startswith("-"):
                raise InvalidVersion(line)
            pins[canonicalize_name(name.strip())] = Version(version.strip())
        except InvalidVersion:
            problems.append(f"{lock.name}:{number}: not a name==version pin: {raw.strip()}")
    return pins, problems


def lock_problems(reqs: list[Requirement], pins: dict[str, Version]) -> list[str]:
    """A line for each requirement the lock does not meet."""
    problems = []
    for req in reqs:
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"pyproject requires {req} but the lock has no {req.name}")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"pyproject requires {req} but the lock pins {req.name}=={pinned}")
    return problems


def installed() -> dict[str, Version]:
    """This environment's installed distributions by canonical name (the first on sys.path, the one imported)."""
    have: dict[str, Version] = {}
    for dist in metadata.distributions():
        if dist.metadata["Name"]:
            have.setdefault(canonicalize_name(dist.metadata["Name"]), Version(dist.version))
    return have


def installed_problems(pins: dict[str, Version], have: dict[str, Version]) -> list[str]:
    """A line for each difference between the installed versions and the lock (pip and pctune aside)."""
    problems = []
    for name in sorted((pins.keys() | have.keys()) - NOT_LOCKED):
        if name not in have:
            problems.append(f"the lock pins {name}=={pins[name]} but it is not installed")
        elif name not in pins:
            problems.append(f"{name}=={have[name]} is installed but not in the lock")
        elif have[name] != pins[name]:
            problems.append(f"{name}=={have[name]} is installed but the lock pins {name}=={pins[name]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--lock", type=Path, default=ROOT / "requirements" / "lock.txt")
    parser.add_argument("--no-installed", action="store_true", help="skip comparing the installed versions")
    args = parser.parse_args(argv)
    pins, problems = read_lock(args.lock)
    problems += lock_problems(requirements(args.pyproject), pins)
    if not args.no_installed:
        problems += installed_problems(pins, installed())
    for line in problems:
        print(f"check_lock: {line}", file=sys.stderr)
    if problems:
        print(f"check_lock: {len(problems)} problem(s); `make lock` refreshes the lock from pyproject.toml, "
              "`rm -rf .venv && make install` rebuilds .venv from the lock", file=sys.stderr)
        return 1
    where = "" if args.no_installed else f"; {sys.prefix} has exactly these versions"
    print(f"check_lock: {args.lock.name} ({len(pins)} pins) meets {args.pyproject.name}{where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
