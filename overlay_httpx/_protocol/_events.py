"""Events a tunnel reports to its driver, as immutable dataclasses (h11 style).

Every event names the peer's static key (`peer`, 32 bytes) so one queue can
serve every tunnel of an endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .._address import Address
from .._identity import PublicIdentity

__all__ = [
    "ERROR_APPLICATION",
    "ERROR_IDLE_TIMEOUT",
    "ERROR_NO_ERROR",
    "ERROR_PEER_RESTARTED",
    "ERROR_PORT_UNREACHABLE",
    "ERROR_PROTOCOL",
    "ERROR_STREAM_LIMIT",
    "ERROR_TUNNEL_CLOSED",
    "Event",
    "HandshakeCompleted",
    "HandshakeFailed",
    "PathChanged",
    "StreamMoved",
    "StreamOpened",
    "StreamReadable",
    "StreamReset",
    "StreamStopSending",
    "StreamWritable",
    "TunnelClosed",
]

# Error codes carried by RESET_STREAM, STOP_SENDING and CLOSE.
ERROR_NO_ERROR: Final = 0x0
ERROR_APPLICATION: Final = 0x1
ERROR_PORT_UNREACHABLE: Final = 0x2
ERROR_STREAM_LIMIT: Final = 0x3
ERROR_PEER_RESTARTED: Final = 0x4
ERROR_TUNNEL_CLOSED: Final = 0x5
ERROR_IDLE_TIMEOUT: Final = 0x6
ERROR_PROTOCOL: Final = 0x7


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """Keys exist with this peer (first time, after a rekey, or after its restart)."""

    peer: bytes
    address: Address
    identity: PublicIdentity
    endpoint: tuple[str, int]
    rekey: bool
    peer_restarted: bool


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """No response within the handshake timeout, or the peer refused us; streams were failed."""

    peer: bytes
    reason: str
    refused: bool = False
    """The peer answered with an authenticated refusal (its trust policy said no)."""


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream to one of our listening ports."""

    peer: bytes
    stream_id: int
    port: int


@dataclass(frozen=True, slots=True)
class StreamReadable:
    """New in-order bytes or the end of the stream can be read with `Tunnel.read_stream`.

    Data stays in the tunnel until read, so flow control holds the peer back
    when the application reads slowly.
    """

    peer: bytes
    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer abandoned its sending side (RESET_STREAM), or the tunnel did."""

    peer: bytes
    stream_id: int
    error_code: int
    reason: str = ""
    delivered: int = 0
    """Bytes of our sending side the peer acknowledged in order before the end: a
    layer above can tell which of its messages the peer can never have seen."""


@dataclass(frozen=True, slots=True)
class StreamMoved:
    """The peer restarted before it acknowledged anything of our stream; the stream
    carries on, all its bytes resent, under a new id on the new connection."""

    peer: bytes
    old_stream_id: int
    new_stream_id: int


@dataclass(frozen=True, slots=True)
class StreamStopSending:
    """The peer will not read more; our sending side has been reset in answer."""

    peer: bytes
    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class StreamWritable:
    """The stream's send buffer drained below its limit: the writer may continue."""

    peer: bytes
    stream_id: int


@dataclass(frozen=True, slots=True)
class PathChanged:
    """A validated packet arrived from a new address; replies go there now."""

    peer: bytes
    old: tuple[str, int]
    new: tuple[str, int]


@dataclass(frozen=True, slots=True)
class TunnelClosed:
    """The tunnel is gone: by us, by the peer's CLOSE, or by the idle timeout."""

    peer: bytes
    error_code: int
    reason: str
    by_peer: bool


Event = (
    HandshakeCompleted
    | HandshakeFailed
    | StreamOpened
    | StreamReadable
    | StreamMoved
    | StreamReset
    | StreamStopSending
    | StreamWritable
    | PathChanged
    | TunnelClosed
)
