"""Frames: the units packed back to back inside an encrypted packet payload.

The layouts follow QUIC (RFC 9000 §19) closely enough that anyone who knows
QUIC can read a hex dump, with two deliberate differences: a STREAM frame at
offset 0 carries the destination ``port`` (so opening a stream needs no extra
round trip), and the ACK delay is sent in plain microseconds (no exponent).
All integers are QUIC variable-length integers (RFC 9000 §16).

Encoding is strict: a value the wire cannot carry is a local bug and raises
``ValueError``. Decoding treats the payload as hostile: `parse_frames` raises
`FrameError` and nothing else, whatever bytes it is given.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from .._exceptions import FrameError
from ._fastinit import fast_frozen_init

__all__ = [
    "MAX_REASON_SIZE",
    "MAX_VARINT",
    "Ack",
    "Close",
    "DataBlocked",
    "Frame",
    "MaxData",
    "MaxStreamData",
    "MaxStreams",
    "Padding",
    "PathChallenge",
    "PathResponse",
    "Ping",
    "ResetStream",
    "StopSending",
    "Stream",
    "StreamDataBlocked",
    "decode_varint",
    "encode_frame",
    "encode_varint",
    "encoded_size",
    "is_ack_eliciting",
    "parse_frames",
    "stream_frame_overhead",
    "varint_size",
]

MAX_VARINT: Final = (1 << 62) - 1
MAX_REASON_SIZE: Final = 1024
_MAX_PORT: Final = 0xFFFF
_PATH_DATA_SIZE: Final = 8

_PADDING: Final = 0x00
_PING: Final = 0x01
_ACK: Final = 0x02
_RESET_STREAM: Final = 0x04
_STOP_SENDING: Final = 0x05
_STREAM: Final = 0x08
_STREAM_OFF: Final = 0x04
_STREAM_LEN: Final = 0x02
_STREAM_FIN: Final = 0x01
_STREAM_OFF_LEN: Final = _STREAM | _STREAM_OFF | _STREAM_LEN
_STREAM_PORT_LEN: Final = _STREAM | _STREAM_LEN
_MAX_DATA: Final = 0x10
_MAX_STREAM_DATA: Final = 0x11
_MAX_STREAMS: Final = 0x12
_DATA_BLOCKED: Final = 0x14
_STREAM_DATA_BLOCKED: Final = 0x15
_PATH_CHALLENGE: Final = 0x1A
_PATH_RESPONSE: Final = 0x1B
_CLOSE: Final = 0x1C

# Masks that strip the two-bit length prefix, indexed by that prefix.
_VARINT_MASKS: Final = (0x3F, 0x3FFF, 0x3FFF_FFFF, MAX_VARINT)
_NONZERO: Final = re.compile(rb"[^\x00]")

_Buffer: TypeAlias = "bytes | memoryview"


# -- frame types -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Padding:
    """A run of ``length`` zero bytes; consecutive padding parses as one frame."""

    length: int


@dataclass(frozen=True, slots=True)
class Ping:
    """Asks for an acknowledgement and nothing else (keepalive, loss probe)."""


@fast_frozen_init
@dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledged packet numbers.

    ``ranges`` are inclusive ``(smallest, largest)`` pairs, sorted by largest
    descending, neither overlapping nor adjacent. ``ack_delay`` is how long
    (microseconds) the receiver held the largest before acknowledging it.
    """

    ranges: tuple[tuple[int, int], ...]
    ack_delay: int


@dataclass(frozen=True, slots=True)
class ResetStream:
    """The sender abandons its side of a stream at ``final_size`` bytes."""

    stream_id: int
    error_code: int
    final_size: int


@dataclass(frozen=True, slots=True)
class StopSending:
    """The receiver asks the peer to stop sending on a stream."""

    stream_id: int
    error_code: int


@fast_frozen_init
@dataclass(frozen=True, slots=True)
class Stream:
    """Stream bytes at ``offset``; ``port`` is set exactly when ``offset == 0``."""

    stream_id: int
    offset: int
    data: bytes
    fin: bool
    port: int | None


@dataclass(frozen=True, slots=True)
class MaxData:
    """Connection-wide flow-control limit (total bytes across streams)."""

    maximum: int


@dataclass(frozen=True, slots=True)
class MaxStreamData:
    """Per-stream flow-control limit (highest offset the peer may send)."""

    stream_id: int
    maximum: int


@dataclass(frozen=True, slots=True)
class MaxStreams:
    """Cumulative count of streams the peer may open."""

    maximum: int


@dataclass(frozen=True, slots=True)
class DataBlocked:
    """The sender has data but the connection-wide limit stops it."""

    limit: int


@dataclass(frozen=True, slots=True)
class StreamDataBlocked:
    """The sender has data but the stream's limit stops it."""

    stream_id: int
    limit: int


@dataclass(frozen=True, slots=True)
class PathChallenge:
    """Eight unpredictable bytes the peer must echo to prove a new path."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PathResponse:
    """The echo of a `PathChallenge`."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Closes the whole tunnel; ``reason`` is at most 1024 bytes of UTF-8 on the wire."""

    error_code: int
    reason: str


Frame: TypeAlias = (
    Padding
    | Ping
    | Ack
    | ResetStream
    | StopSending
    | Stream
    | MaxData
    | MaxStreamData
    | MaxStreams
    | DataBlocked
    | StreamDataBlocked
    | PathChallenge
    | PathResponse
    | Close
)

_NOT_ACK_ELICITING: Final = (Ack, Padding, Close)


def is_ack_eliciting(frame: Frame) -> bool:
    """Whether receiving ``frame`` obliges the peer to acknowledge its packet."""
    return not isinstance(frame, _NOT_ACK_ELICITING)


# -- variable-length integers ----------------------------------------------------------------


def varint_size(value: int) -> int:
    """Bytes `encode_varint` writes for ``value``; ValueError if it does not fit."""
    if value < 0x40:
        if value < 0:
            raise ValueError(f"varint {value} is negative")
        return 1
    if value < 0x4000:
        return 2
    if value < 0x4000_0000:
        return 4
    if value <= MAX_VARINT:
        return 8
    raise ValueError(f"varint {value} exceeds 2**62-1")


def encode_varint(value: int, out: bytearray) -> None:
    """Append ``value`` in the shortest RFC 9000 §16 form."""
    if value < 0x40:
        if value < 0:
            raise ValueError(f"varint {value} is negative")
        out.append(value)
    elif value < 0x4000:
        out += (value | 0x4000).to_bytes(2, "big")
    elif value < 0x4000_0000:
        out += (value | 0x8000_0000).to_bytes(4, "big")
    elif value <= MAX_VARINT:
        out += (value | 0xC000_0000_0000_0000).to_bytes(8, "big")
    else:
        raise ValueError(f"varint {value} exceeds 2**62-1")


def decode_varint(data: _Buffer, pos: int) -> tuple[int, int]:
    """Read the varint at ``pos``; return ``(value, position after it)``.

    Non-minimal encodings are accepted, as RFC 9000 requires.
    """
    try:
        first = data[pos]
    except IndexError:
        raise FrameError("truncated varint") from None
    prefix = first >> 6
    if prefix == 0:
        return first, pos + 1
    end = pos + (1 << prefix)
    if end > len(data):
        raise FrameError("truncated varint")
    return int.from_bytes(data[pos:end], "big") & _VARINT_MASKS[prefix], end


# -- encoding --------------------------------------------------------------------------------


def _reason_bytes(reason: str) -> bytes:
    """The wire form of a close reason, cut to MAX_REASON_SIZE at a character boundary."""
    raw = reason.encode("utf-8", "replace")
    if len(raw) > MAX_REASON_SIZE:
        raw = raw[:MAX_REASON_SIZE].decode("utf-8", "ignore").encode("utf-8")
    return raw


def _ack_fields(frame: Ack) -> list[int]:
    """The ACK varints after the type, validating ``ranges`` (ValueError)."""
    ranges = frame.ranges
    if not ranges:
        raise ValueError("an ACK frame needs at least one range")
    smallest, largest = ranges[0]
    if not 0 <= smallest <= largest:
        raise ValueError(f"bad ACK range {ranges[0]!r}")
    fields = [largest, frame.ack_delay, len(ranges) - 1, largest - smallest]
    for lo, hi in ranges[1:]:
        if not 0 <= lo <= hi or hi >= smallest - 1:
            raise ValueError(
                f"ACK range {(lo, hi)!r} is empty, overlaps, touches or is above {smallest}"
            )
        fields.append(smallest - hi - 2)
        fields.append(hi - lo)
        smallest = lo
    return fields


def _stream_head(frame: Stream, last: bool) -> tuple[int, list[int]]:
    """The STREAM type byte and header varints, validating the port (ValueError)."""
    ftype = _STREAM | (_STREAM_FIN if frame.fin else 0)
    fields = [frame.stream_id]
    if frame.offset == 0:
        if frame.port is None:
            raise ValueError("a STREAM frame at offset 0 must name a port")
        if not 0 <= frame.port <= _MAX_PORT:
            raise ValueError(f"port {frame.port} out of range 0..{_MAX_PORT}")
        fields.append(frame.port)
    else:
        if frame.port is not None:
            raise ValueError(f"a STREAM frame at offset {frame.offset} must not carry a port")
        ftype |= _STREAM_OFF
        fields.append(frame.offset)
    if frame.offset + len(frame.data) > MAX_VARINT:
        raise ValueError("STREAM frame ends beyond 2**62-1")
    if not last:
        ftype |= _STREAM_LEN
        fields.append(len(frame.data))
    return ftype, fields


def _layout(frame: Frame, last: bool) -> tuple[int, Sequence[int], bytes]:
    """Type byte, varint fields and trailing raw bytes of any frame but Padding.

    The one place that knows each layout, so `encode_frame` and `encoded_size`
    cannot disagree. Validates what the wire cannot carry (ValueError).
    """
    if isinstance(frame, Stream):
        ftype, fields = _stream_head(frame, last)
        return ftype, fields, frame.data
    if isinstance(frame, Ack):
        return _ACK, _ack_fields(frame), b""
    if isinstance(frame, MaxStreamData):
        return _MAX_STREAM_DATA, (frame.stream_id, frame.maximum), b""
    if isinstance(frame, Ping):
        return _PING, (), b""
    if isinstance(frame, MaxData):
        return _MAX_DATA, (frame.maximum,), b""
    if isinstance(frame, MaxStreams):
        return _MAX_STREAMS, (frame.maximum,), b""
    if isinstance(frame, ResetStream):
        return _RESET_STREAM, (frame.stream_id, frame.error_code, frame.final_size), b""
    if isinstance(frame, StopSending):
        return _STOP_SENDING, (frame.stream_id, frame.error_code), b""
    if isinstance(frame, DataBlocked):
        return _DATA_BLOCKED, (frame.limit,), b""
    if isinstance(frame, StreamDataBlocked):
        return _STREAM_DATA_BLOCKED, (frame.stream_id, frame.limit), b""
    if isinstance(frame, (PathChallenge, PathResponse)):
        if len(frame.data) != _PATH_DATA_SIZE:
            raise ValueError(f"path data must be {_PATH_DATA_SIZE} bytes, got {len(frame.data)}")
        ftype = _PATH_CHALLENGE if isinstance(frame, PathChallenge) else _PATH_RESPONSE
        return ftype, (), bytes(frame.data)
    if isinstance(frame, Close):
        reason = _reason_bytes(frame.reason)
        return _CLOSE, (frame.error_code, len(reason)), reason
    raise TypeError(f"not a frame: {frame!r}")


def _padding_length(frame: Padding) -> int:
    if frame.length < 1:
        raise ValueError(f"padding length must be at least 1, got {frame.length}")
    return frame.length


def encode_frame(frame: Frame, out: bytearray, *, last: bool = False) -> None:
    """Append ``frame`` to ``out``.

    ``last=True`` means the frame ends the packet: a STREAM frame then omits its
    length field and its data runs to the end of the payload. Other frames
    ignore it. Values the wire cannot carry raise ValueError (a local bug).

    The two frames of nearly every packet, a STREAM frame with a length and a
    single-range ACK, are written here directly: building `_layout`'s field
    list costs more than the encoding. Each shortcut is taken only when the
    frame passes the checks `_layout` would make, writes the same fields in
    the same order (so even a varint error leaves ``out`` as `_layout` would),
    and anything else goes the generic way.
    """
    if type(frame) is Stream and not last:
        if offset := frame.offset:
            data = frame.data
            if frame.port is None and offset + len(data) <= MAX_VARINT:
                out.append(_STREAM_OFF_LEN | (_STREAM_FIN if frame.fin else 0))
                encode_varint(frame.stream_id, out)
                encode_varint(offset, out)
                encode_varint(len(data), out)
                out += data
                return
        elif (port := frame.port) is not None and 0 <= port <= _MAX_PORT:
            data = frame.data
            out.append(_STREAM_PORT_LEN | (_STREAM_FIN if frame.fin else 0))
            encode_varint(frame.stream_id, out)
            encode_varint(port, out)
            encode_varint(len(data), out)
            out += data
            return
    elif type(frame) is Ack and len(frame.ranges) == 1:
        smallest, largest = frame.ranges[0]
        if 0 <= smallest <= largest:
            out.append(_ACK)
            encode_varint(largest, out)
            encode_varint(frame.ack_delay, out)
            out.append(0)  # no further ranges
            encode_varint(largest - smallest, out)
            return
    _encode_generic(frame, out, last)


def _encode_generic(frame: Frame, out: bytearray, last: bool) -> None:
    """`encode_frame` for any frame, through `_layout` (the reference for the shortcuts)."""
    if isinstance(frame, Padding):
        out += bytes(_padding_length(frame))
        return
    ftype, fields, tail = _layout(frame, last)
    out.append(ftype)
    for value in fields:
        encode_varint(value, out)
    out += tail


def encoded_size(frame: Frame) -> int:
    """Bytes `encode_frame` appends for ``frame`` (with ``last=False``).

    With the same shortcuts as `encode_frame`, for the same reason.
    """
    if type(frame) is Stream:
        if offset := frame.offset:
            if frame.port is None and offset + (length := len(frame.data)) <= MAX_VARINT:
                head = varint_size(frame.stream_id) + varint_size(offset) + varint_size(length)
                return 1 + head + length
        elif (port := frame.port) is not None and 0 <= port <= _MAX_PORT:
            length = len(frame.data)
            head = varint_size(frame.stream_id) + varint_size(port) + varint_size(length)
            return 1 + head + length
    elif type(frame) is Ack and len(frame.ranges) == 1:
        smallest, largest = frame.ranges[0]
        if 0 <= smallest <= largest:
            # the type byte, largest, delay, a one-byte range count (0), the range
            head = varint_size(largest) + varint_size(frame.ack_delay)
            return 2 + head + varint_size(largest - smallest)
    return _encoded_size_generic(frame)


def _encoded_size_generic(frame: Frame) -> int:
    """`encoded_size` for any frame, through `_layout` (the reference for the shortcuts)."""
    if isinstance(frame, Padding):
        return _padding_length(frame)
    _, fields, tail = _layout(frame, False)
    return 1 + sum(varint_size(v) for v in fields) + len(tail)


def stream_frame_overhead(stream_id: int, offset: int, data_len: int, port: int | None) -> int:
    """Header bytes of a STREAM frame with a length field, before its data.

    The port counts only at offset 0 and the offset only when non-zero,
    mirroring `encode_frame`.
    """
    size = 1 + varint_size(stream_id) + varint_size(data_len)
    if offset:
        return size + varint_size(offset)
    return size + (varint_size(port) if port is not None else 0)


# -- decoding --------------------------------------------------------------------------------
# Each parser takes the payload (bytes: `parse_frames` copies a memoryview once) and the
# position after the type byte, and returns (frame, position after the frame).
# parse_frames names the frame in errors.


def _parse_ack(data: bytes, pos: int, ftype: int) -> tuple[Frame, int]:
    largest, pos = decode_varint(data, pos)
    delay, pos = decode_varint(data, pos)
    count, pos = decode_varint(data, pos)
    first, pos = decode_varint(data, pos)
    smallest = largest - first
    if not count:  # one range, the usual case: no list to build
        if smallest < 0:
            raise FrameError(f"first range {first} goes below packet 0")
        return Ack(((smallest, largest),), delay), pos
    if count > (len(data) - pos) // 2:  # each range takes two bytes at least
        raise FrameError(f"range count {count} exceeds what the packet holds")
    if smallest < 0:
        raise FrameError(f"first range {first} goes below packet 0")
    ranges = [(smallest, largest)]
    for _ in range(count):
        gap, pos = decode_varint(data, pos)
        length, pos = decode_varint(data, pos)
        hi = smallest - gap - 2
        lo = hi - length
        if lo < 0:
            raise FrameError("a range goes below packet 0")
        ranges.append((lo, hi))
        smallest = lo
    return Ack(tuple(ranges), delay), pos


def _parse_stream(data: bytes, pos: int, ftype: int) -> tuple[Frame, int]:
    size = len(data)
    if pos < size and data[pos] < 0x40:  # a one-byte stream id, the usual case
        stream_id = data[pos]
        pos += 1
    else:
        stream_id, pos = decode_varint(data, pos)
    port: int | None = None
    if ftype & _STREAM_OFF:
        offset, pos = decode_varint(data, pos)
        if offset == 0:
            raise FrameError("offset 0 sent with the OFF bit, so without a port")
    else:
        offset = 0
        port, pos = decode_varint(data, pos)
        if port > _MAX_PORT:
            raise FrameError(f"port {port} out of range 0..{_MAX_PORT}")
    if ftype & _STREAM_LEN:
        length, pos = decode_varint(data, pos)
        end = pos + length
        if end > size:
            raise FrameError(f"length {length} exceeds the {size - pos} bytes left")
    else:
        end = size
    if offset + (end - pos) > MAX_VARINT:
        raise FrameError("data ends beyond 2**62-1")
    return Stream(stream_id, offset, data[pos:end], bool(ftype & _STREAM_FIN), port), end


def _parse_path(data: bytes, pos: int, ftype: int) -> tuple[Frame, int]:
    end = pos + _PATH_DATA_SIZE
    if end > len(data):
        raise FrameError("truncated data")
    raw = bytes(data[pos:end])
    return (PathChallenge(raw) if ftype == _PATH_CHALLENGE else PathResponse(raw)), end


def _parse_close(data: bytes, pos: int, ftype: int) -> tuple[Frame, int]:
    code, pos = decode_varint(data, pos)
    length, pos = decode_varint(data, pos)
    if length > MAX_REASON_SIZE:
        raise FrameError(f"reason of {length} bytes exceeds {MAX_REASON_SIZE}")
    end = pos + length
    if end > len(data):
        raise FrameError("truncated reason")
    return Close(code, bytes(data[pos:end]).decode("utf-8", "replace")), end


def _ints(
    build: Callable[..., Frame], count: int
) -> Callable[[bytes, int, int], tuple[Frame, int]]:
    """A parser for a frame of ``count`` varint fields passed to ``build`` in order."""

    def parse(data: bytes, pos: int, ftype: int) -> tuple[Frame, int]:
        values: list[int] = []
        for _ in range(count):
            value, pos = decode_varint(data, pos)
            values.append(value)
        return build(*values), pos

    return parse


_Parser: TypeAlias = Callable[[bytes, int, int], tuple[Frame, int]]
_PARSERS: Final[dict[int, tuple[str, _Parser]]] = {
    _PING: ("PING", lambda data, pos, t: (Ping(), pos)),
    _ACK: ("ACK", _parse_ack),
    _RESET_STREAM: ("RESET_STREAM", _ints(ResetStream, 3)),
    _STOP_SENDING: ("STOP_SENDING", _ints(StopSending, 2)),
    **{t: ("STREAM", _parse_stream) for t in range(_STREAM, _STREAM + 8)},
    _MAX_DATA: ("MAX_DATA", _ints(MaxData, 1)),
    _MAX_STREAM_DATA: ("MAX_STREAM_DATA", _ints(MaxStreamData, 2)),
    _MAX_STREAMS: ("MAX_STREAMS", _ints(MaxStreams, 1)),
    _DATA_BLOCKED: ("DATA_BLOCKED", _ints(DataBlocked, 1)),
    _STREAM_DATA_BLOCKED: ("STREAM_DATA_BLOCKED", _ints(StreamDataBlocked, 2)),
    _PATH_CHALLENGE: ("PATH_CHALLENGE", _parse_path),
    _PATH_RESPONSE: ("PATH_RESPONSE", _parse_path),
    _CLOSE: ("CLOSE", _parse_close),
}


def parse_frames(payload: bytes | memoryview) -> list[Frame]:
    """Decode every frame of a decrypted packet payload, in order.

    Raises FrameError (and nothing else) on any malformed input, an unknown
    frame type included; the message names the frame. An empty payload
    yields an empty list (the packet layer decides whether that is allowed).
    """
    # One up-front copy of a memoryview is cheaper than indexing it byte by byte
    # (and normalises odd formats); bytes are used as they are, without a copy.
    data = payload if type(payload) is bytes else bytes(payload)
    end = len(data)
    frames: list[Frame] = []
    pos = 0
    while pos < end:
        ftype = data[pos]
        if ftype == _PADDING:
            # Padding usually fills the rest of the packet: one memcmp settles that.
            if data[pos:] == bytes(end - pos):
                stop = end
            else:
                match = _NONZERO.search(data, pos)
                stop = end if match is None else match.start()
            frames.append(Padding(stop - pos))
            pos = stop
            continue
        entry = _PARSERS.get(ftype)
        if entry is None:
            raise FrameError(f"unknown frame type {ftype:#04x} at byte {pos}")
        try:
            frame, pos = entry[1](data, pos + 1, ftype)
        except FrameError as exc:
            raise FrameError(f"malformed {entry[0]} frame at byte {pos}: {exc}") from None
        frames.append(frame)
    return frames
