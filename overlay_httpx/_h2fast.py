"""A lean path through h2 for whole messages: the frame layer is ours, the state is h2's.

Why: in place, between an app's and an event loop's work, h2 costs a small
request several times what it costs in a tight loop, and most of it is its
frame layer (hyperframe objects built, serialised and parsed, generic dispatch
per frame), not its state. For the common shapes (a header block and a whole
body sent at once; a read holding new streams' header blocks and their DATA)
`send_message` and `receive` write and read the frames themselves and drive
h2's own stream state machines, windows and events, in the order h2's calls
would, so h2's state is left exactly as its own calls leave it.

Anything else goes to h2 unchanged: padding, priority, CONTINUATION, other
frame types, trailers, informational responses, a header block the HPACK
cache does not know (h2 decodes it, and the cache learns it), a body beyond
one frame or the flow-control windows, a connection not open. The callers
fall back whenever these return False or None, having changed nothing.

`ENABLED` comes from a self-check at import: the same exchanges through h2's
calls and through this path, on two pairs of connections, must leave the
same state, output and events; with an h2 unlike the one this was written
against it is False and the callers use h2 alone.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from typing import Any, Final

from h2.connection import AllowedStreamIDs, ConnectionInputs, ConnectionState, H2Connection
from h2.events import Event
from h2.exceptions import ProtocolError, TooManyStreamsError
from h2.stream import StreamInputs, StreamState

from . import _h2compat

__all__ = ["ENABLED", "receive", "send_message"]

_HEADER: Final = struct.Struct(">HBBBL")  # length (24 bits as 16 + 8), type, flags, stream
_DATA: Final = 0x0
_HEADERS: Final = 0x1
_END_STREAM: Final = 0x1
_END_HEADERS: Final = 0x4
_OPEN: Final = (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN)
#: slack per field over its name and value in an HPACK block without Huffman
#: coding (the representation byte and two length prefixes), for the size check
_FIELD_SLACK: Final = 16


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    size = len(payload)
    return _HEADER.pack(size >> 8, size & 0xFF, kind, flags, stream_id) + payload


def _final_status(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """A response head whose status is not informational (1xx takes h2's own path)."""
    return bool(headers) and headers[0][0] == b":status" and not headers[0][1].startswith(b"1")


def send_message(
    conn: H2Connection, stream_id: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> bool:
    """Queue a whole message on `conn`: its header block, then `body` (if any), ending the stream.

    A client opens `stream_id` with it (the request); a server answers the
    request on it (a final response). Equivalent to h2's ``send_headers`` and
    ``send_data(end_stream=True)`` (``send_headers(end_stream=True)`` with no
    body). Returns False, having changed nothing, when this is not the simple
    case (see the module docstring): the caller then makes those calls.
    """
    config = conn.config
    if not ENABLED or conn.state_machine.state not in _OPEN:
        return False
    if config.normalize_outbound_headers or config.validate_outbound_headers:
        return False  # h2 would rewrite or check the fields (both users turn this off)
    size = len(body)
    limit = conn.max_outbound_frame_size
    if size > limit:
        return False
    bound = 0
    for name, value in headers:
        bound += len(name) + len(value) + _FIELD_SLACK
    if bound > limit:
        return False  # the block might need CONTINUATION frames
    client = config.client_side
    existing = conn.streams.get(stream_id)
    if client:
        if existing is not None or stream_id <= conn.highest_outbound_stream_id:
            return False
        if stream_id % 2 != 1:
            return False
        if conn.open_outbound_streams >= conn.remote_settings.max_concurrent_streams:
            return False
        window = conn.remote_settings.initial_window_size
    else:
        if existing is None or existing.state_machine.headers_sent or not _final_status(headers):
            return False
        if existing.state_machine.state not in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE):
            return False
        window = existing.outbound_flow_control_window
    if size > window or size > conn.outbound_flow_control_window:
        return False
    # What H2Connection.send_headers, then send_data, do, in their order.
    conn.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
    if existing is None:
        stream = conn._begin_new_stream(stream_id, AllowedStreamIDs.ODD)
    else:
        stream = existing
    machine = stream.state_machine
    machine.process_input(StreamInputs.SEND_HEADERS)
    block = conn.encoder.encode(headers)
    method = None
    for name, value in headers:
        if name == b":method":
            method = value
        elif client and name == b":authority" and stream._authority is None:
            stream._authority = value
    stream.request_method = method
    if not size:
        machine.process_input(StreamInputs.SEND_END_STREAM)
        conn._data_to_send += _frame(_HEADERS, _END_HEADERS | _END_STREAM, stream_id, block)
        return True
    conn.state_machine.process_input(ConnectionInputs.SEND_DATA)
    machine.process_input(StreamInputs.SEND_DATA)
    machine.process_input(StreamInputs.SEND_END_STREAM)
    stream.outbound_flow_control_window -= size
    conn.outbound_flow_control_window -= size
    conn._data_to_send += _frame(_HEADERS, _END_HEADERS, stream_id, block) + _frame(
        _DATA, _END_STREAM, stream_id, body
    )
    return True


def _plan(conn: H2Connection, data: bytes) -> list[tuple[int, int, int, Any]] | None:
    """The frames of `data` as (type, flags, stream, payload or header list), if all are of
    the shapes `receive` takes; None otherwise. Reads state, changes nothing."""
    client = conn.config.client_side
    limit = conn.max_inbound_frame_size
    streams = conn.streams
    highest = conn.highest_inbound_stream_id
    plan: list[tuple[int, int, int, Any]] = []
    current = 0  # the stream whose header block came last in this read
    ended = False
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 9:
            return None
        high, low, kind, flags, stream_id = _HEADER.unpack_from(data, pos)
        length = (high << 8) | low
        start = pos + 9
        pos = start + length
        if pos > end or length > limit:
            return None
        stream_id &= 0x7FFFFFFF
        if kind == _HEADERS:
            if flags & ~(_END_STREAM | _END_HEADERS) or not flags & _END_HEADERS:
                return None
            headers = _h2compat.cached_headers(conn, data[start:pos])
            if headers is None:
                return None
            if client:
                stream = streams.get(stream_id)
                if stream is None or stream.state_machine.headers_received:
                    return None
                if stream.state_machine.state not in (
                    StreamState.OPEN,
                    StreamState.HALF_CLOSED_LOCAL,
                ):
                    return None
                if not _final_status(headers):
                    return None
            elif stream_id % 2 != 1 or stream_id <= highest or stream_id in streams:
                return None
            else:
                highest = stream_id
            current, ended = stream_id, bool(flags & _END_STREAM)
            plan.append((kind, flags, stream_id, headers))
        elif kind == _DATA:
            if flags & ~_END_STREAM or stream_id != current or ended:
                return None
            ended = bool(flags & _END_STREAM)
            plan.append((kind, flags, stream_id, data[start:pos]))
        else:
            return None
    return plan


def receive(conn: H2Connection, data: bytes) -> list[Event] | None:
    """h2's ``receive_data(data)`` for a read of the shapes this path takes, else None
    (nothing changed: the caller hands `data` to h2).

    A server takes new streams' header blocks (requests) and their DATA; a
    client, the response heads of its open streams and their DATA. A
    protocol error ends the connection as h2 would (GOAWAY queued) and is raised.
    """
    if not ENABLED or conn.state_machine.state not in _OPEN:
        return None
    buffered = conn.incoming_buffer
    if buffered._data or buffered._headers_buffer or buffered._preamble_len:
        return None
    if type(data) is not bytes:
        data = bytes(data)
    plan = _plan(conn, data)
    if plan is None:
        return None
    client = conn.config.client_side
    machine = conn.state_machine
    events: list[Event] = []
    try:
        for kind, flags, stream_id, payload in plan:
            end_stream = bool(flags & _END_STREAM)
            if kind == _HEADERS:
                # What H2Connection._receive_headers_frame does, in its order.
                if not client and stream_id not in conn.streams:
                    most = conn.local_settings.max_concurrent_streams
                    open_now = conn.open_inbound_streams
                    if open_now + 1 > most:
                        raise TooManyStreamsError(f"Max inbound streams is {most}, {open_now} open")
                events += machine.process_input(ConnectionInputs.RECV_HEADERS)
                stream = conn._get_or_create_stream(stream_id, AllowedStreamIDs(not client))
                events += stream.receive_headers(payload, end_stream, conn.config.header_encoding)[
                    1
                ]
            else:
                # What H2Connection._receive_data_frame does.
                size = len(payload)
                events += machine.process_input(ConnectionInputs.RECV_DATA)
                conn._inbound_flow_control_window_manager.window_consumed(size)
                events += conn.streams[stream_id].receive_data(payload, end_stream, size)[1]
    except ProtocolError as exc:
        conn._terminate_connection(exc.error_code)
        raise
    return events


# -- the self-check ----------------------------------------------------------------------------


def _state(conn: H2Connection) -> Any:
    """What of `conn` the two paths must leave alike (object identities aside)."""
    streams = {
        sid: (
            vars(stream.state_machine),
            stream.outbound_flow_control_window,
            vars(stream._inbound_window_manager),
            stream._expected_content_length,
            stream._actual_content_length,
            stream.request_method,
            stream._authority,
        )
        for sid, stream in conn.streams.items()
    }
    return (
        conn.state_machine.state,
        conn.highest_inbound_stream_id,
        conn.highest_outbound_stream_id,
        conn.outbound_flow_control_window,
        vars(conn._inbound_flow_control_window_manager),
        streams,
        dict(conn._closed_streams),
        bytes(conn._data_to_send),
    )


def _event_state(events: list[Event]) -> list[Any]:
    return [(type(e).__name__, {k: repr(v) for k, v in vars(e).items()}) for e in events]


def _pair() -> tuple[H2Connection, H2Connection]:
    from h2.config import H2Configuration

    client, server = (
        H2Connection(
            H2Configuration(
                client_side=side,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        for side in (True, False)
    )
    for conn in (client, server):
        _h2compat.cache_hpack(conn)
        conn.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def _self_check() -> bool:
    post = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"example.overlay"),
        (b":path", b"/v1/echo"),
        (b"content-type", b"application/json"),
        (b"content-length", b"17"),
    ]
    get = [*post[:4], (b"accept", b"*/*")]
    ok = [(b":status", b"200"), (b"content-length", b"9")]
    lean, plain = _pair(), _pair()
    taken: set[str] = set()
    # a header block is cached from its third use on (the first adds to the HPACK table,
    # the second is the first to leave it unchanged): five POSTs, then three bodiless GETs
    for stream_id in range(1, 17, 2):
        head, body, answer, reply = (
            (post, b'{"prompt": "hi"}\n', ok, b"thank you")
            if stream_id < 11
            else (get, b"", [(b":status", b"204")], b"")
        )
        seen = []
        for (client, server), fast in ((lean, True), (plain, False)):
            if fast and send_message(client, stream_id, head, body):
                taken.add("request")
            else:
                client.send_headers(stream_id, head, end_stream=not body)
                if body:
                    client.send_data(stream_id, body, end_stream=True)
            wire = client.data_to_send()
            got = receive(server, wire) if fast else None
            if got is not None:
                taken.add("read request")
            seen.append(_event_state(got if got is not None else server.receive_data(wire)))
            if fast and send_message(server, stream_id, answer, reply):
                taken.add("response" if reply else "empty response")
            else:
                server.send_headers(stream_id, answer, end_stream=not reply)
                if reply:
                    server.send_data(stream_id, reply, end_stream=True)
            wire = server.data_to_send()
            got = receive(client, wire) if fast else None
            if got is not None:
                taken.add("read response")
            seen.append(_event_state(got if got is not None else client.receive_data(wire)))
        if seen[:2] != seen[2:]:
            return False
        if _state(lean[0]) != _state(plain[0]) or _state(lean[1]) != _state(plain[1]):
            return False
    return len(taken) == 5  # every step took this path at least once


def _check() -> bool:
    global ENABLED
    ENABLED = True
    try:
        ENABLED = _self_check()
    except Exception:  # an h2 unlike the one this was written against
        ENABLED = False
    if not ENABLED:
        logging.getLogger("overlay_httpx").debug("the lean HTTP/2 path is off (self-check)")
    return ENABLED


ENABLED: bool = False
_check()
