"""Tunnel tuning knobs, validated once so the state machines can trust them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

from ._congestion import CONGESTION_CONTROLLERS, CongestionControl

__all__ = ["MIN_DATAGRAM_SIZE", "TunnelConfig"]

MIN_DATAGRAM_SIZE: Final = 1200
MAX_DATAGRAM_SIZE: Final = 65_000


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    """Per-tunnel settings; every duration is in seconds.

    Defaults follow the design brief: 1200-byte datagrams (safe on every
    path), keepalive after 30 s idle, idle timeout 120 s, a new handshake after
    120 s of use, handshake given up after 5 s.

    `congestion_control` picks the controller: ``"bbr"`` (model-based, keeps
    its rate under random loss) or ``"newreno"`` (RFC 9002's loss-based one).
    """

    max_datagram_size: int = MIN_DATAGRAM_SIZE
    handshake_timeout: float = 5.0
    handshake_retry: float = 0.25
    keepalive: float | None = 30.0
    persistent_keepalive: bool = False
    idle_timeout: float = 120.0
    rekey_after_time: float = 120.0
    rekey_after_messages: int = 2**60
    max_streams: int = 1024
    initial_max_data: int = 4 << 20
    max_data_window: int = 64 << 20
    initial_max_stream_data: int = 1 << 20
    max_stream_data_window: int = 16 << 20
    send_buffer_limit: int = 2 << 20
    max_ack_delay: float = 0.025
    initial_rtt: float = 0.1
    congestion_control: CongestionControl = "bbr"
    max_tunnels: int = 4096
    """Tunnels (peers) at once; beyond it new peers are refused and connects fail."""
    handshake_rate_limit: int = 200
    """Handshakes per second (Diffie-Hellman work) before initiations need a cookie."""
    max_pending_handshakes: int = 1024
    """Answered, unconfirmed handshakes before initiations need a cookie."""
    handshake_source_rate: float = 20.0
    """Initiations per second per source IP address while under load."""
    handshake_source_burst: float = 10.0

    def __post_init__(self) -> None:
        self._check_types()
        if self.congestion_control not in CONGESTION_CONTROLLERS:
            raise ValueError(
                f"congestion_control={self.congestion_control!r}: expected one of "
                f"{', '.join(map(repr, CONGESTION_CONTROLLERS))}"
            )
        if not MIN_DATAGRAM_SIZE <= self.max_datagram_size <= MAX_DATAGRAM_SIZE:
            raise ValueError(
                f"max_datagram_size={self.max_datagram_size}: expected "
                f"{MIN_DATAGRAM_SIZE}..{MAX_DATAGRAM_SIZE}"
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (bool, str)) or value is None:
                continue
            if value <= 0:
                raise ValueError(f"{f.name}={value!r}: expected a positive number")
        if self.keepalive is not None and self.keepalive >= self.idle_timeout:
            raise ValueError(
                f"keepalive={self.keepalive} must be shorter than idle_timeout={self.idle_timeout}"
            )

    def _check_types(self) -> None:
        """Every field of the type it declares (an int is a fine float): the tunnel core
        is compiled (see hatch_build.py) and would refuse a wrong type later, and less
        clearly, than this."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            if kind == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name}={value!r}: expected True or False")
            elif kind == "int":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{f.name}={value!r}: expected a whole number")
            elif kind in ("float", "float | None"):
                if value is None and kind == "float | None":
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{f.name}={value!r}: expected a number")
                object.__setattr__(self, f.name, float(value))
