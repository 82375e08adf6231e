"""The pipeline example's tests: real UDP on 127.0.0.1, on asyncio and on trio.

The repository root goes on ``sys.path`` so that ``import examples.pipeline`` works
however pytest is started (it is also the child processes' working directory).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
