"""A lean path through h2 for small messages: the frame layer is ours, the state is h2's.

Why: in place, between an app's and an event loop's work, h2 costs a small
request several times what it costs in a tight loop, and most of it is its
frame layer (hyperframe objects built, serialised and parsed, dispatch per
frame), not its state.

`send_message` writes a request's or a final response's header block and
whole body (one frame, within the flow-control windows); `receive` reads
the run of HEADERS and DATA frames that ends a read, after h2 has read the
frames before it (a connection's preface and SETTINGS, a WINDOW_UPDATE).
Both drive h2's own connection and stream state machines, stream methods,
window managers and HPACK coders, in the order h2's calls do, so h2's
state, its output and the events are what h2 alone would give.

What h2 treats apart stays with h2: padding, priority, CONTINUATION,
frames on streams it closed or never opened, a frame after END_STREAM in
the same read, a read that does not end at a frame's end, a body beyond one
frame or the windows, an informational response to send, a connection that
is not open. There these return False or None having changed nothing, and
the callers make h2's own calls.

`ENABLED` comes from a self-check at import: the same exchanges through h2's
calls and through this path, on two pairs of connections, must leave the
same state, output and events; with an h2 unlike the one this was written
against it is False and the callers use h2 alone.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import h2.connection
from h2.connection import AllowedStreamIDs, ConnectionInputs, ConnectionState, H2Connection
from h2.events import Event
from h2.exceptions import ProtocolError, TooManyStreamsError
from h2.stream import StreamInputs, StreamState
from hpack import Decoder, HeaderTuple

from . import _h2compat

__all__ = ["ENABLED", "receive", "receive_data", "send_message"]

_HEADER: Final = struct.Struct(">HBBBL")  # length (24 bits as 16 + 8), type, flags, stream
_DATA: Final = 0x0
_HEADERS: Final = 0x1
_END_STREAM: Final = 0x1
_END_HEADERS: Final = 0x4
#: connection states in which h2 sends and reads streams' frames (IDLE: before the first)
_OPEN: Final = (ConnectionState.IDLE, ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN)
#: stream states in which h2 reads a header block or DATA on an existing stream
_READING: Final = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)
#: h2's own decoding of a header block, HPACK errors made h2 errors (None: not this h2)
_decode_headers: Callable[[Decoder, bytes], Iterable[HeaderTuple]] | None = getattr(
    h2.connection, "_decode_headers", None
)
#: for the size check of a header block: Huffman coding (which hpack applies unless
#: `_h2compat`'s encoder is in use) makes a byte at most 30 bits; a field adds a
#: representation byte and two length prefixes
_HUFFMAN_MOST: Final = 4
_FIELD_SLACK: Final = 16
#: no frame size limit is below this (RFC 9113 section 6.5.2)
_SMALLEST_LIMIT: Final = 16384
_SETTINGS: Final = 0x4
_ACK: Final = 0x1


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
    if type(body) is not bytes:
        body = bytes(body)  # a view's bytes, whatever its item size
    size = len(body)
    limit = conn.max_outbound_frame_size
    if size > limit or type(headers) is not list or not headers:
        return False
    bound = 0
    method = authority = None  # the first of each, as h2 takes them
    for field in headers:
        if len(field) != 2:
            return False  # a (name, value, sensitive) triple: h2 knows what to make of it
        name, value = field
        if type(name) is not bytes or type(value) is not bytes:
            return False  # str fields: h2 encodes them
        bound += _HUFFMAN_MOST * (len(name) + len(value)) + _FIELD_SLACK
        if name == b":method" and method is None:
            method = value
        elif name == b":authority" and authority is None:
            authority = value
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
    if client and stream._authority is None:
        stream._authority = authority
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


def _lean_shaped(kind: int, flags: int) -> bool:
    """A HEADERS frame holding its whole block, without padding or priority; or an
    unpadded DATA frame."""
    if kind == _HEADERS:
        return flags & _END_HEADERS != 0 and flags & ~(_END_STREAM | _END_HEADERS) == 0
    return kind == _DATA and flags & ~_END_STREAM == 0


#: a frame of a read: type, flags, stream, where its payload starts, where it ends
_Frame = tuple[int, int, int, int, int]


def _split(data: bytes, pos: int) -> tuple[int, list[_Frame]] | None:
    """Where the frames of `data` from `pos` stop being h2's to read (the start of the
    longest run of lean-shaped frames ending the read), and the run's frames. None if
    that run is empty, if the read does not end on a frame's end, or if a SETTINGS ACK
    before the run might change the frame size limit for a frame of it (h2 checks a
    whole read against the limit in force when it arrived): h2 then reads it all.
    Shapes only."""
    lean = 0
    run: list[_Frame] = []
    ack = False  # a SETTINGS ACK before the run
    longest = 0  # the run's longest frame
    end = len(data)
    while pos < end:
        if end - pos < 9:
            return None
        high, low, kind, flags, stream_id = _HEADER.unpack_from(data, pos)
        length = (high << 8) | low
        if _lean_shaped(kind, flags):
            if not run:
                lean, longest = pos, 0
            longest = max(longest, length)
            run.append((kind, flags, stream_id & 0x7FFFFFFF, pos + 9, pos + 9 + length))
        else:
            run = []
            ack = ack or (kind == _SETTINGS and flags & _ACK != 0)
        pos += 9 + length
    if pos != end or not run or (ack and longest > _SMALLEST_LIMIT):
        return None
    return lean, run


def _plan(
    conn: H2Connection, data: bytes, run: list[_Frame]
) -> list[tuple[int, int, int, bytes, int]] | None:
    """The frames of `run` (from `_split`) as (type, flags, stream, payload, where it
    ends); None unless `receive` can take each frame as h2 would. Reads state, changes
    nothing."""
    client = conn.config.client_side
    limit = conn.max_inbound_frame_size
    streams = conn.streams
    highest = conn.highest_inbound_stream_id
    plan: list[tuple[int, int, int, bytes, int]] = []
    headed: set[int] = set()  # streams whose header block is in this read
    ended: set[int] = set()  # streams this read ends
    for kind, flags, stream_id, start, stop in run:
        if stop - start > limit:
            return None
        stream = streams.get(stream_id)
        if stream_id in ended:
            return None  # h2 treats a frame after END_STREAM apart
        if kind == _HEADERS:
            if client:
                # a response's head (or trailers) on a stream we opened and still read
                if stream is None or stream.state_machine.state not in _READING:
                    return None
            elif stream_id % 2 != 1 or stream_id <= highest or stream is not None:
                return None  # not a new stream of the client's: h2 says what it is
            else:
                highest = stream_id
            plan.append((kind, flags, stream_id, data[start:stop], stop))
            headed.add(stream_id)
        else:
            # the body of a message whose head came in this read or earlier
            if stream_id not in headed:
                if stream is None or stream.state_machine.state not in _READING:
                    return None
                if client and not stream.state_machine.headers_received:
                    return None
            plan.append((kind, flags, stream_id, data[start:stop], stop))
        if flags & _END_STREAM:
            ended.add(stream_id)
    return plan


def receive(conn: H2Connection, data: bytes) -> list[Event] | None:
    """h2's ``receive_data(data)``, reading the frames this path takes itself.

    Those are a run of frames ending the read: a server's new streams' header
    blocks and the DATA of its open streams; a client's response heads and
    DATA on the streams it opened. h2 reads the frames before them (a
    connection's preface and SETTINGS, say) first, and the run too if a frame
    of it turns out to be one h2 treats apart. With no such run this returns
    None and the caller hands `data` to h2. A protocol error ends the
    connection as h2 would (GOAWAY queued) and is raised.
    """
    if not ENABLED or _decode_headers is None:
        return None
    buffered = conn.incoming_buffer
    if buffered._data or buffered._headers_buffer:
        return None
    if type(data) is not bytes:
        data = bytes(data)
    preface = buffered._preamble_len
    if preface and data[:preface] != buffered._preamble:
        return None
    split = _split(data, preface)
    if split is None:
        return None
    lean, run = split
    events: list[Event] = []
    if lean:
        try:
            events = conn.receive_data(data[:lean])
        except BaseException:
            buffered.add_data(data[lean:])  # h2 keeps what it did not read
            raise
    plan = None
    if conn.state_machine.state in _OPEN and not (buffered._data or buffered._headers_buffer):
        plan = _plan(conn, data, run)  # (a header block still open: CONTINUATION must come)
    if plan is None:
        events += conn.receive_data(data[lean:])
        return events
    client = conn.config.client_side
    machine = conn.state_machine
    read = lean  # where the frame being read ends
    try:
        for kind, flags, stream_id, payload, frame_end in plan:
            read = frame_end
            end_stream = bool(flags & _END_STREAM)
            if kind == _HEADERS:
                # What H2Connection._receive_headers_frame does, in its order.
                if not client and stream_id not in conn.streams:
                    most = conn.local_settings.max_concurrent_streams
                    open_now = conn.open_inbound_streams
                    if open_now + 1 > most:
                        raise TooManyStreamsError(f"Max inbound streams is {most}, {open_now} open")
                headers = _decode_headers(conn.decoder, payload)  # the HPACK cache's, mostly
                events += machine.process_input(ConnectionInputs.RECV_HEADERS)
                stream = conn._get_or_create_stream(stream_id, AllowedStreamIDs(not client))
                encoding = conn.config.header_encoding
                events += stream.receive_headers(headers, end_stream, encoding)[1]
            else:
                # What H2Connection._receive_data_frame does.
                size = len(payload)
                events += machine.process_input(ConnectionInputs.RECV_DATA)
                conn._inbound_flow_control_window_manager.window_consumed(size)
                events += conn.streams[stream_id].receive_data(payload, end_stream, size)[1]
    except BaseException as exc:
        buffered.add_data(data[read:])  # h2 keeps what it did not read
        if isinstance(exc, ProtocolError):
            conn._terminate_connection(exc.error_code)
        raise
    return events


def receive_data(conn: H2Connection, data: bytes) -> list[Event]:
    """h2's ``receive_data(data)``: by this path where `receive` takes the read, else h2's."""
    events = receive(conn, data)
    return conn.receive_data(data) if events is None else events


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
        tuple(conn.encoder.header_table.dynamic_entries),
        tuple(conn.decoder.header_table.dynamic_entries),
        bytes(conn.incoming_buffer._data),
        [bytes(frame.serialize()) for frame in conn.incoming_buffer._headers_buffer],
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
        conn.initiate_connection()  # the prefaces leave with the first request and response
    return client, server


def _step(
    sender: H2Connection,
    receiver: H2Connection,
    fast: bool,
    stream_id: int,
    message: tuple[list[tuple[bytes, bytes]], bytes],
    taken: set[str],
) -> list[Any]:
    """One whole message from `sender` to `receiver`, by this path if `fast`, else by
    h2's own calls; the receiver's events, as `_event_state` gives them."""
    headers, body = message
    what = ("request" if sender.config.client_side else "response") + (" with body" * bool(body))
    if fast and send_message(sender, stream_id, headers, body):
        taken.add("send " + what)
    else:
        sender.send_headers(stream_id, headers, end_stream=not body)
        if body:
            sender.send_data(stream_id, body, end_stream=True)
    wire = sender.data_to_send()
    events = receive(receiver, wire) if fast else None
    if events is None:
        events = receiver.receive_data(wire)
    else:
        taken.add("read " + what)
    return _event_state(events)


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
    # three POSTs, then three bodiless GETs: new header blocks, then ones the HPACK
    # caches know; the first request and response carry the prefaces and SETTINGS
    for stream_id in range(1, 13, 2):
        request, response = (
            ((post, b'{"prompt": "hi"}\n'), (ok, b"thank you"))
            if stream_id < 7
            else ((get, b""), ([(b":status", b"204")], b""))
        )
        seen = []
        for (client, server), fast in ((lean, True), (plain, False)):
            seen.append(_step(client, server, fast, stream_id, request, taken))
            seen.append(_step(server, client, fast, stream_id, response, taken))
        if seen[:2] != seen[2:]:
            return False
        if _state(lean[0]) != _state(plain[0]) or _state(lean[1]) != _state(plain[1]):
            return False
    return len(taken) == 8  # each kind of message was sent and read by this path


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
