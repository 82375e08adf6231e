"""The ``overlay-httpx`` command line: its parser, its logging and its exit codes.

Every subcommand lives in its own module with an ``add_parser``; this module
puts them together and turns whatever a command raises into one line on
stderr (see `report`), so users see what was wrong and what was expected,
never a traceback unless they pass ``--debug``. Exit codes: 0 success,
1 runtime failure, 2 bad command line, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from .._protocol import COMPILED
from .._version import __version__
from . import _expose, _find, _gateway, _keygen, _rendezvous, _request, _serve, _status
from ._errors import PROG, UsageError, report

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Persistent encrypted UDP overlay tunnels between Python services, from the
shell: make an identity, serve an ASGI app or an existing HTTP service on an
overlay port, send requests to overlay URLs, or open a local TCP gateway into
the overlay. Run 'overlay-httpx COMMAND --help' for each command."""

EXAMPLES = """\
examples:
  overlay-httpx keygen --out llm.key
  overlay-httpx serve main:app --identity llm.key --bind 0.0.0.0:4000
  overlay-httpx request http://1-0001-0001-0001.overlay/health --peer ADDRESS=IDENTITY@HOST:PORT
  overlay-httpx gateway --listen 127.0.0.1:8080 --to 1:0001.0001.0001 --peer ...
  overlay-httpx expose 127.0.0.1:8000 --port 80
"""

_COMMANDS = (_keygen, _rendezvous, _serve, _find, _request, _status, _gateway, _expose)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: what was wrong and where to read more."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _global_options(*, inherit: bool) -> argparse.ArgumentParser:
    """``--debug`` and ``--backend``, accepted before or after the command.

    The copy on each subcommand defaults to SUPPRESS, so it only overrides
    the top-level value when given there.
    """
    parser = _Parser(add_help=False)
    group = parser.add_argument_group("global options")
    default_debug: object = argparse.SUPPRESS if inherit else False
    default_backend: object = argparse.SUPPRESS if inherit else "asyncio"
    group.add_argument(
        "--debug",
        action="store_true",
        default=default_debug,
        help="log what the node does and show tracebacks",
    )
    group.add_argument(
        "--backend",
        choices=["asyncio", "trio"],
        default=default_backend,
        help="event loop to run on (default: asyncio)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options(inherit=False)],
    )
    core = "compiled" if COMPILED else "pure-Python"
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__} ({core} tunnel core)"
    )
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", parser_class=_Parser
    )
    parents = [_global_options(inherit=True)]
    for command in _COMMANDS:
        command.add_parser(subparsers, parents)
    return parser


class _OneLine(logging.Formatter):
    """``overlay-httpx: warning: message (ExcType: detail)``: no traceback."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f" ({type(exc).__name__}: {exc}; --debug shows the traceback)"
        return " ".join(text.split())


def _configure_logging(debug: bool) -> None:
    logger = logging.getLogger("overlay_httpx")
    for handler in list(logger.handlers):
        if getattr(handler, "_overlay_httpx_cli", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._overlay_httpx_cli = True  # type: ignore[attr-defined]
    if debug:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.setLevel(logging.DEBUG)
    else:
        handler.setFormatter(_OneLine())
        logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: ``sys.argv[1:]``); the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 1
    debug: bool = args.debug
    _configure_logging(debug)
    try:
        if args.command is None:
            raise UsageError(
                "a command is required: "
                + ", ".join(c.__name__.rsplit("_", 1)[-1] for c in _COMMANDS)
                + f" (see '{PROG} --help')"
            )
        if args.backend == "trio" and importlib.util.find_spec("trio") is None:
            raise UsageError("--backend trio needs the trio package (pip install trio)")
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        return report(exc, debug=debug)
    return code


def _silence_stdout() -> None:
    """The reader went away (``| head``): stop Python complaining when it flushes stdout."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
