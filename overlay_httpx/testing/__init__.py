"""Test helpers for code built on overlay_httpx (public, like ``trio.testing``).

`Network` carries datagrams between sans-IO endpoints over simulated links with
a `VirtualClock`, so loss, reordering, timers and long idle periods run
deterministically and in milliseconds.
"""

from ._network import (
    Endpoint,
    Fate,
    LinkConfig,
    Network,
    NetworkStatistics,
    TraceEntry,
    VirtualClock,
)

__all__ = [
    "Endpoint",
    "Fate",
    "LinkConfig",
    "Network",
    "NetworkStatistics",
    "TraceEntry",
    "VirtualClock",
]
