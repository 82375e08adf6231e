"""Immutable statistics snapshots (trio's `statistics()` convention)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .._address import Address

__all__ = ["EndpointStatistics", "TunnelStatistics"]


@dataclass(frozen=True, slots=True)
class TunnelStatistics:
    """One tunnel at one instant. RTT figures are seconds (None before a sample)."""

    peer: bytes
    peer_address: Address | None
    remote_addr: tuple[str, int]
    state: str
    smoothed_rtt: float | None
    min_rtt: float | None
    latest_rtt: float | None
    rttvar: float | None
    congestion_window: int
    bytes_in_flight: int
    packets_sent: int
    packets_received: int
    bytes_sent: int
    bytes_received: int
    packets_lost: int
    frames_retransmitted: int
    streams: int
    handshakes: int
    rekeys: int
    path_changes: int
    path: str = "direct"
    """"direct", or "relayed" while the tunnel's packets go through the rendezvous."""


@dataclass(frozen=True, slots=True)
class EndpointStatistics:
    """All tunnels of an endpoint plus the datagrams dropped before reaching one."""

    tunnels: tuple[TunnelStatistics, ...]
    datagrams_received: int
    datagrams_sent: int
    drops: dict[str, int] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())
