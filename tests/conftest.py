"""Shared by every test directory: its presence puts ``tests/`` on ``sys.path``, so
test modules can import ``_fuzzing`` and ``_build`` (pytest's default "prepend" import mode).

``OVERLAY_HTTPX_EXPECT=compiled`` (or ``pure``) makes the run fail at once if
the ``overlay_httpx`` it imports is not that build: CI tests both, and must not
test one twice by mistake.
"""

from __future__ import annotations

import os

import pytest

import overlay_httpx
from overlay_httpx._protocol import COMPILED

_BUILD = "compiled" if COMPILED else "pure"


def pytest_report_header() -> str:
    return f"overlay_httpx: {os.path.dirname(overlay_httpx.__file__)} ({_BUILD} tunnel core)"


def pytest_configure(config: pytest.Config) -> None:
    expected = os.environ.get("OVERLAY_HTTPX_EXPECT", "")
    if expected not in ("", "compiled", "pure"):
        raise pytest.UsageError(f"OVERLAY_HTTPX_EXPECT={expected!r}: expected compiled or pure")
    if expected and expected != _BUILD:
        raise pytest.UsageError(
            f"OVERLAY_HTTPX_EXPECT={expected} but {overlay_httpx.__file__} has the "
            f"{_BUILD} tunnel core"
        )
