"""The ``ssg-engine`` command line: sample, spectrum, bench, plan, train, eval, fid-sample, info.

``common`` holds what every command shares (value checks, model / sampling / batch flags, error reporting); each other
module registers its commands' parsers (``add_parsers``) and handlers. ``python -m ssg_engine.cli`` runs ``main``.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from . import bench, info, plan, sample, train
from . import eval as evaluation
from .common import CLIParser, run_cli

COMMAND_MODULES = (sample, bench, plan, train, evaluation, info)  # in the order ``ssg-engine --help`` lists them


def build_parser() -> argparse.ArgumentParser:
    """The ``ssg-engine`` parser with every command; a parsed command line's ``func(args)`` runs it."""
    parser = CLIParser(prog="ssg-engine", description=__doc__.splitlines()[0], epilog="SSG_ENGINE_DEBUG=1 shows the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``ssg-engine``: see ``run_cli`` for how errors and Ctrl-C are reported."""
    return run_cli(build_parser(), argv)
