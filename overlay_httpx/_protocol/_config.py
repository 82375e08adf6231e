"""Tunnel tuning knobs, validated once so the state machines can trust them."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields
from typing import Final

from ._congestion import CONGESTION_CONTROLLERS, CongestionControl

__all__ = ["MIN_DATAGRAM_SIZE", "TunnelConfig", "whole_number"]

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
        """Every field of the type it declares, finite, and an integer small enough for
        the wire (an int is a fine float): the tunnel core is compiled (see
        hatch_build.py) and would refuse a wrong type later, and less clearly."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            if kind == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name}={value!r}: expected True or False")
            elif kind == "int":
                whole = whole_number(value)
                if whole is None or whole > _MAX_WIRE_INT:
                    raise ValueError(f"{f.name}={value!r}: expected a whole number below 2**62")
                object.__setattr__(self, f.name, whole)
            elif kind in ("float", "float | None"):
                if value is None and kind == "float | None":
                    continue
                number = None if isinstance(value, bool) else _finite(value)
                if number is None:
                    raise ValueError(f"{f.name}={value!r}: expected a finite number")
                object.__setattr__(self, f.name, number)
            elif kind != "CongestionControl":  # checked against its names by the caller
                raise TypeError(f"TunnelConfig.{f.name}: no check for a field of type {kind}")


#: the largest value a QUIC-style varint carries (every integer setting may go on the wire)
_MAX_WIRE_INT: Final = (1 << 62) - 1


def whole_number(value: object) -> int | None:
    """`value` as an int if it is an integer (``__index__``: an int, a numpy integer),
    not a bool and not a float; else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _finite(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and not isinstance(value, str) else None
