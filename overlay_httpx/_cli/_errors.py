"""The CLI's two failure kinds and how any exception becomes one line on stderr.

Commands raise `CliError` (a runtime failure, exit 1) or `UsageError` (the
command line was wrong, exit 2) with a message that names what was wrong and
what was expected. Everything else that escapes a command is turned into one
line here too, so a user never sees a traceback unless they ask with
``--debug``.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator

import httpx

from .._exceptions import OverlayError

__all__ = ["PROG", "CliError", "UsageError", "describe", "leaves", "report"]

PROG = "overlay-httpx"


class CliError(Exception):
    """A failure to report in one line; `exit_code` is what the process exits with."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CliError):
    """The command line asked for something impossible: exit 2, like argparse."""

    exit_code = 2


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups, or `exc` itself.

    Task groups wrap what their tasks raise; the user cares about what was raised.
    Exception groups are recognised by shape, so this also works on Python 3.10.
    """
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple) and hasattr(exc, "split"):
        for child in inner:
            if isinstance(child, BaseException):
                yield from leaves(child)
        return
    yield exc


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe(exc: BaseException) -> str:
    """A one-line description of an exception the command did not anticipate."""
    if isinstance(exc, (CliError, OverlayError, httpx.HTTPError)):
        return _one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, OSError):
        detail = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename else ""
        return _one_line(f"{detail}{where}")
    return _one_line(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")


def report(exc: BaseException, *, debug: bool) -> int:
    """Print `exc` as ``overlay-httpx: error: ...`` (and its traceback with `debug`).

    Returns the exit code: 130 for an interrupt, the `CliError`'s own code, else 1.
    """
    found = list(leaves(exc))
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in found):
        return 130
    chosen = next((leaf for leaf in found if isinstance(leaf, CliError)), found[0])
    if debug:
        traceback.print_exception(chosen, file=sys.stderr)
    print(f"{PROG}: error: {describe(chosen)}", file=sys.stderr, flush=True)
    return chosen.exit_code if isinstance(chosen, CliError) else 1
