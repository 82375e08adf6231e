"""The sans-IO tunnel: pure state machines driven by datagrams and explicit time.

Nothing in this package touches sockets, event loops or the wall clock; every
entry point takes ``now`` (seconds, any monotonic origin).
"""

from typing import Final

__all__ = ["COMPILED"]

COMPILED: Final[bool] = not __file__.endswith(".py")
"""Whether this package is the mypyc-compiled build of itself (see hatch_build.py).

The two builds are meant to behave alike (tests/protocol/test_builds.py checks
where values cross into the core); the compiled one runs the per-packet path
about 2.5 times faster (benchmarks/bench_core.py).
"""
