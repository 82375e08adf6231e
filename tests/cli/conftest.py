"""CLI tests: in-process ones run on asyncio and on trio; subprocess ones are plain tests."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
