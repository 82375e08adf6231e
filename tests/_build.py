"""Which build of the tunnel core is under test: pure Python or mypyc-compiled."""

from __future__ import annotations

import pytest

from overlay_httpx._protocol import COMPILED

__all__ = ["COMPILED", "patches_the_core"]

#: a test that replaces a tunnel-core class attribute or module constant: compiled
#: code binds those at build time, so only the pure-Python run can patch them
patches_the_core = pytest.mark.skipif(
    COMPILED,
    reason="patches the tunnel core, which the compiled build binds at build time "
    "(the pure-Python run covers it)",
)
