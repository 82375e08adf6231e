"""`NodeStatistics`: what `Node.statistics()` returns, a snapshot of one node."""

from __future__ import annotations

from dataclasses import dataclass

from .._address import Address
from .._protocol._stats import TunnelStatistics
from ._udp import Addr

__all__ = ["NodeStatistics"]


@dataclass(frozen=True, slots=True)
class NodeStatistics:
    """A node at one instant (trio's `statistics()` convention: an immutable snapshot)."""

    address: Address
    endpoint: Addr
    receive_buffer: int
    """SO_RCVBUF as granted by the kernel (Linux reports twice the usable size)."""
    send_buffer: int
    max_datagram_size: int
    tunnels: tuple[TunnelStatistics, ...]
    streams: int
    listeners: tuple[int, ...]
    datagrams_received: int
    datagrams_sent: int
    drops: dict[str, int]
    """Datagrams dropped before reaching a tunnel, by reason."""
    send_errors: dict[str, int]
    """Datagrams the kernel refused to send, by errno name (treated as loss)."""
    rendezvous: str | None = None
    registered: bool = False
    observed_endpoint: Addr | None = None
    """Our UDP endpoint as the rendezvous sees it (after any NAT)."""
    relayed_tunnels: int = 0
