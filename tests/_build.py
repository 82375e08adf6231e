"""Which build of the tunnel core is under test: pure Python or mypyc-compiled."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from overlay_httpx._protocol import COMPILED

__all__ = ["COMPILED", "ROOT", "child_env", "patches_the_core"]

ROOT = Path(__file__).resolve().parent.parent

#: a test that replaces a tunnel-core class attribute or module constant: compiled
#: code binds those at build time, so only the pure-Python run can patch them
patches_the_core = pytest.mark.skipif(
    COMPILED,
    reason="patches the tunnel core, which the compiled build binds at build time "
    "(the pure-Python run covers it)",
)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a Python child that runs this repository's modules
    (``python -m examples.pipeline``, a node in a network namespace).

    The build under test (a compiled one on ``PYTHONPATH``) comes first and the
    repository last; the working directory is not put first (``PYTHONSAFEPATH``,
    Python 3.11+), where the source tree's pure-Python core would shadow it.
    """
    env = dict(os.environ)
    paths = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT)])
    env["PYTHONSAFEPATH"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env
