"""``pctune search`` and ``pctune results``."""

from __future__ import annotations

import argparse


def add_search_commands(commands) -> None:
    search = commands.add_parser("search", help="tune beta/lambda/alpha with Ray Tune + Optuna")
    search.add_argument("job", help="a job name in jobs/ or a job TOML path")
    search.set_defaults(handler=_search)


def _search(args: argparse.Namespace) -> int:
    print("pctune search is not implemented yet (see the search issue); the engine and model zoo are.")
    return 1
