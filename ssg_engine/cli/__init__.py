"""The ``ssg-engine`` command line: sample, spectrum, bench, plan, train, eval, fid-sample, info, serve.

``common`` holds what every command shares (value checks, model / sampling / batch flags, error reporting); each other
module registers its commands' parsers (``add_parsers``) and handlers. ``python -m ssg_engine.cli`` runs ``main``.
This module imports nothing heavy: ``main`` takes Ctrl-C over before torch is imported.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any, Optional, Sequence

COMMAND_MODULES = ("sample", "bench", "plan", "train", "eval", "info", "serve")  # in the order ``ssg-engine --help`` lists them


def build_parser() -> argparse.ArgumentParser:
    """The ``ssg-engine`` parser with every command; a parsed command line's ``func(args)`` runs it."""
    import importlib

    from .common import CLIParser

    parser = CLIParser(prog="ssg-engine", description=__doc__.splitlines()[0], epilog="SSG_ENGINE_DEBUG=1 shows the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f".{name}", __name__).add_parsers(sub)
    return parser


def _interrupted_while_starting(signum: int, frame: Any) -> None:
    """Ctrl-C while the command imports torch and builds its parser: nothing is written yet, so one line and exit
    at once (no half-imported module left to shut down)."""
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    os._exit(130)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``ssg-engine``: see ``common.run_cli`` for how errors and Ctrl-C are reported. Ctrl-C during start-up (the
    imports) is one ``interrupted`` line and status 130 too, never a traceback."""
    starting = (threading.current_thread() is threading.main_thread()  # not when SIGINT is ignored or handled elsewhere
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if starting:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    try:
        from .common import run_cli

        parser = build_parser()
    finally:
        if starting:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the command's own cleanup runs on KeyboardInterrupt
    return run_cli(parser, argv)
