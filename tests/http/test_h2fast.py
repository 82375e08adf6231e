"""The lean HTTP/2 path leaves h2 exactly as h2's own calls do, and steps aside otherwise.

Two client/server pairs, made as the transport and the bridge make theirs, go
through the same exchanges: one through `_h2fast` wherever it takes them, one
through h2 alone. Every byte sent, every event and h2's state must agree.
"""

from __future__ import annotations

import array
import contextlib
import itertools
from collections import Counter
from typing import Any

import pytest
from h2.connection import H2Connection
from h2.events import Event
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from hpack import Encoder
from hypothesis import given
from hypothesis import strategies as st

from overlay_httpx import _h2fast
from overlay_httpx._asgi import _connection as server_side
from overlay_httpx._http import _client as client_side
from tests._fuzzing import fuzz_settings

POST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"1-0001-0001-0001.overlay"),
    (b":path", b"/v1/echo"),
    (b"content-type", b"application/json"),
]
GET = [*POST[:4], (b"accept", b"*/*")]
HEAD = [(b":method", b"HEAD"), *POST[1:4]]


def _pair(settled: bool = True) -> tuple[H2Connection, H2Connection]:
    """A client and a server connection; `settled`: prefaces and SETTINGS exchanged
    through h2 already, else they go with the first request and response."""
    client = client_side._new_h2()
    server = server_side._new_h2(100, 65536)
    if settled:
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        server.receive_data(client.data_to_send())
    return client, server


def _events(events: list[Event]) -> list[Any]:
    return _h2fast._event_state(events)


class _Ended(Exception):
    """Both sides met the same protocol error: the connection is over."""


class _Both:
    """The same exchanges on a lean pair and a plain pair, compared at every step."""

    def __init__(self, settled: bool = True) -> None:
        self.lean, self.plain = _pair(settled), _pair(settled)
        self.taken: Counter[str] = Counter()

    def send(
        self, side: int, stream_id: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        def lean(conn: H2Connection) -> None:
            if _h2fast.send_message(conn, stream_id, headers, body):
                self.taken["send"] += 1
            else:
                plain(conn)

        def plain(conn: H2Connection) -> None:
            conn.send_headers(stream_id, headers, end_stream=not body)
            frame = conn.max_outbound_frame_size
            for start in range(0, len(body), frame):
                piece = body[start : start + frame]
                conn.send_data(stream_id, piece, end_stream=start + frame >= len(body))

        self._both(side, lean, plain)

    def call(self, side: int, name: str, *args: Any) -> None:
        self._both(side, *[lambda conn: getattr(conn, name)(*args)] * 2)

    def _both(self, side: int, lean: Any, plain: Any) -> None:
        errors = []
        for pair, do in ((self.lean, lean), (self.plain, plain)):
            try:
                do(pair[side])
                errors.append(None)
            except ProtocolError as exc:
                errors.append(type(exc))
        assert errors[0] is errors[1]
        for s in (0, 1):
            assert _h2fast._state(self.lean[s]) == _h2fast._state(self.plain[s])
        if errors[0] is not None:
            raise _Ended

    def deliver(self, side: int, cuts: list[int]) -> list[Event]:
        """What `side` queued, to the other side in pieces cut at `cuts`; returns the events."""
        wire = _sent(self, side)
        bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
        got: list[list[Event]] = [[], []]
        errors: list[type[Exception] | None] = [None, None]
        for i, (pair, fast) in enumerate(((self.lean, True), (self.plain, False))):
            conn = pair[1 - side]
            try:
                for start, stop in itertools.pairwise(bounds):
                    piece = wire[start:stop]
                    events = _h2fast.receive(conn, piece) if fast else None
                    if events is None:
                        events = conn.receive_data(piece)
                    else:
                        self.taken["receive"] += 1
                    got[i] += events
                    for event in events:  # give back the window, as both users do
                        length = getattr(event, "flow_controlled_length", 0)
                        if length and event.stream_id in conn.streams:
                            conn.acknowledge_received_data(length, event.stream_id)
            except ProtocolError as exc:
                errors[i] = type(exc)
        assert errors[0] is errors[1]
        assert _events(got[0]) == _events(got[1])
        for s in (0, 1):
            assert _h2fast._state(self.lean[s]) == _h2fast._state(self.plain[s])
        if errors[0] is not None:
            raise _Ended
        return got[1]


def test_the_lean_path_is_on_with_the_installed_h2() -> None:
    assert _h2fast.ENABLED


@pytest.mark.parametrize("settled", [True, False])
def test_a_steady_exchange_takes_the_lean_path_both_ways(settled: bool) -> None:
    """Every request and response, the first ones too (their prefaces and SETTINGS go
    to h2 first), is written and read by the lean path."""
    both = _Both(settled)
    for i in range(6):
        stream_id = 1 + 2 * i
        both.send(0, stream_id, [*POST, (b"content-length", b"16")], b'{"prompt": "hi"}')
        events = [type(e).__name__ for e in both.deliver(0, [])]
        assert events[-3:] == ["RequestReceived", "DataReceived", "StreamEnded"]
        both.send(1, stream_id, [(b":status", b"200"), (b"content-length", b"2")], b"ok")
        events = [type(e).__name__ for e in both.deliver(1, [])]
        assert events[-3:] == ["ResponseReceived", "DataReceived", "StreamEnded"]
    assert both.taken == {"send": 12, "receive": 12}


_REQUESTS = st.sampled_from([POST, GET, HEAD])
_SIZES = st.sampled_from([0, 1, 17, 300, 16_384, 16_385, 40_000])
_STATUSES = st.sampled_from([b"200", b"204", b"404", b"103"])


@fuzz_settings(200)
@given(data=st.data())
def test_any_exchange_leaves_h2_as_h2_would(data: st.DataObject) -> None:
    both = _Both(data.draw(st.booleans(), label="settled"))
    with contextlib.suppress(_Ended):
        _exchanges(both, data)


def _exchanges(both: _Both, data: st.DataObject) -> None:
    next_id, waiting = 1, []
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        step = data.draw(st.sampled_from(["request", "request", "response", "reset", "ping"]))
        if step == "request":
            for _ in range(data.draw(st.integers(1, 3), label="batched")):
                head = data.draw(_REQUESTS)
                client = both.plain[0]
                room = min(
                    client.remote_settings.initial_window_size, client.outbound_flow_control_window
                )
                body = b"b" * min(room, 0 if head is not POST else data.draw(_SIZES))
                if data.draw(st.booleans(), label="content-length"):
                    head = [*head, (b"content-length", str(len(body)).encode())]
                both.send(0, next_id, head, body)
                waiting.append(next_id)
                next_id += 2
            both.deliver(0, data.draw(st.lists(st.integers(0, 10_000), max_size=3)))
        elif step == "response" and waiting:
            stream_id = waiting.pop(data.draw(st.integers(0, len(waiting) - 1)))
            status = data.draw(_STATUSES)
            if status == b"103":
                both.call(1, "send_headers", stream_id, [(b":status", status)])
                waiting.append(stream_id)
            else:
                window = min(
                    both.plain[1].local_flow_control_window(stream_id)
                    if stream_id in both.plain[1].streams
                    else 0,
                    both.plain[1].outbound_flow_control_window,
                )
                size = min(data.draw(_SIZES), window) if status != b"204" else 0
                both.send(1, stream_id, [(b":status", status)], b"r" * size)
            both.deliver(1, data.draw(st.lists(st.integers(0, 10_000), max_size=3)))
        elif step == "reset" and waiting:
            stream_id = waiting.pop(0)
            both.call(0, "reset_stream", stream_id)
            both.deliver(0, [])
        elif step == "ping":
            both.call(data.draw(st.integers(0, 1)), "ping", b"12345678")
            both.deliver(0, [])
            both.deliver(1, [])


def _read_by_both(both: _Both, read: bytes, side: int = 1, *, lean: bool = False) -> Any:
    """`read` to both servers (`side` 0: clients): the same events (or error), GOAWAY and
    state either way; `lean`: the lean path must read it itself. Returns the outcome."""
    outcomes = []
    for conn, fast in ((both.lean[side], True), (both.plain[side], False)):
        try:
            events = _h2fast.receive(conn, read) if fast else None
            if events is None:
                assert not (fast and lean), "the read took h2's path"
                events = conn.receive_data(read)
            outcomes.append(("events", _events(events)))
        except ProtocolError as exc:
            outcomes.append(("error", type(exc).__name__))
        outcomes.append(_h2fast._state(conn))
    assert outcomes[:2] == outcomes[2:]
    return outcomes[0]


def _warm(both: _Both) -> bytes:
    """Two exchanges, then a third request's frames (not delivered)."""
    for stream_id in (1, 3):
        both.send(0, stream_id, [*POST, (b"content-length", b"2")], b"hi")
        both.deliver(0, [])
    both.send(0, 5, [*POST, (b"content-length", b"2")], b"hi")
    return _sent(both, 0)


@fuzz_settings(300)
@given(garbage=st.binary(max_size=200), prefix=st.booleans())
def test_garbage_fails_both_paths_alike(garbage: bytes, prefix: bool) -> None:
    both = _Both()
    wire = _warm(both)
    _read_by_both(both, (wire if prefix else b"") + garbage)


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes([kind, flags])
        + stream_id.to_bytes(4, "big")
        + payload
    )


_FRAME = st.tuples(
    st.sampled_from([0x0, 0x0, 0x0, 0x1, 0x1, 0x2, 0x3, 0x8, 0x9]) | st.integers(0, 255),  # type
    st.sampled_from([0x0, 0x1, 0x4, 0x5, 0x8, 0x20, 0x25]) | st.integers(0, 255),  # flags
    st.sampled_from([1, 3, 5, 7]) | st.sampled_from([0, 2, 9]) | st.integers(0, 2**32 - 1),
    st.binary(max_size=40),  # payload
    st.booleans(),  # a real header block instead of the payload
)


@fuzz_settings(400)
@given(frames=st.lists(_FRAME, max_size=6), prefix=st.booleans())
def test_hostile_frames_fail_both_paths_alike(
    frames: list[tuple[int, int, int, bytes, bool]], prefix: bool
) -> None:
    """Well-formed frames with hostile contents: the lean path's checks fall where h2's do."""
    both = _Both()
    wire = _warm(both)
    block = wire[9 : 9 + int.from_bytes(wire[:3], "big")]  # the third request's header block
    read = wire if prefix else b""
    for kind, flags, stream_id, payload, real_block in frames:
        read += _frame(kind, flags, stream_id, block if real_block else payload)
    _read_by_both(both, read)


_BLOCK = object()  # stands for the third request's header block


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([(0x0, 0x0, 5, b"x")], id="DATA after END_STREAM in the same read"),
        pytest.param([(0x1, 0x5, 3, _BLOCK)], id="a stream id used before"),
        pytest.param([(0x1, 0x5, 2, _BLOCK)], id="an even stream id"),
        pytest.param([(0x0, 0x1, 3, b"x")], id="DATA on a closed stream"),
        pytest.param([(0x0, 0x1, 9, b"x")], id="DATA on an idle stream"),
        pytest.param([(0x1, 0x5, 9, b"\xff\xff")], id="a broken header block"),
        pytest.param([(0x1, 0x25, 9, b"\0\0\0\0\x10" + b"?")], id="a priority flag"),
        pytest.param(
            [(0x1, 0x1, 7, _BLOCK), (0x1, 0x5, 9, _BLOCK)],
            id="a header block left open before the run",
        ),
        pytest.param(
            [(0x6, 0x0, 1, b"12345678"), (0x1, 0x5, 7, _BLOCK)],
            id="an error before the run",
        ),
        pytest.param(
            [(0x1, 0x4, 7, _BLOCK), (0x0, 0x1, 7, b"hello"), (0x1, 0x5, 9, _BLOCK)],
            id="an error inside the run",  # h2 keeps the frames after it unread
        ),
    ],
)
def test_frames_h2_treats_apart_fail_both_paths_alike(
    frames: list[tuple[int, int, int, Any]],
) -> None:
    both = _Both()
    wire = _warm(both)
    block = wire[9 : 9 + int.from_bytes(wire[:3], "big")]
    read = wire + b"".join(
        _frame(k, f, sid, block if p is _BLOCK else p) for k, f, sid, p in frames
    )
    _read_by_both(both, read)


@pytest.mark.parametrize(
    "case",
    ["reset", "body first", "after the end", "trailers", "informational", "unknown stream"],
)
def test_responses_h2_treats_apart_fail_both_paths_alike(case: str) -> None:
    both = _Both()
    for stream_id in (1, 3):
        both.send(0, stream_id, GET, b"")
        both.deliver(0, [])
        both.send(1, stream_id, [(b":status", b"200")], b"ok")
        both.deliver(1, [])
    both.send(0, 5, GET, b"")
    both.deliver(0, [])
    if case == "trailers":
        both.call(1, "send_headers", 5, [(b":status", b"200")])
        both.call(1, "send_headers", 5, [(b"x-trailer", b"1")], True)
    elif case == "informational":
        both.call(1, "send_headers", 5, [(b":status", b"103")])
        both.call(1, "send_headers", 5, [(b":status", b"200")], True)
    else:
        both.send(1, 5, [(b":status", b"200")], b"ok")
    wire = _sent(both)
    if case == "reset":  # the client gave up before the response arrived
        both.call(0, "reset_stream", 5)
        both.call(0, "data_to_send")
    elif case == "body first":  # DATA for a request the server has not answered
        both.send(0, 7, GET, b"")
        both.deliver(0, [])
        wire = _frame(0x0, 0x0, 7, b"x")
    elif case == "after the end":
        wire += _frame(0x0, 0x1, 5, b"x")
    elif case == "unknown stream":
        wire += _frame(0x0, 0x1, 11, b"x")
    _read_by_both(both, wire, side=0)


def test_a_read_that_starts_inside_a_frame_goes_to_h2() -> None:
    """A frame cut after its header: the next read is its payload, however it looks."""
    both = _Both()
    wire = _warm(both)  # HEADERS, then DATA "hi", of stream 5
    head_end = 9 + int.from_bytes(wire[:3], "big")
    inner = _frame(0x0, 0x1, 5, b"hi")  # a payload that reads as a lean frame on its own
    outer = _frame(0x0, 0x1, 5, inner)
    # the request again, with a body of len(inner) bytes that looks like a frame
    for conn in (both.lean[0], both.plain[0]):
        conn.data_to_send()
    first, second = wire[:head_end] + outer[:9], outer[9:]
    for conn in (both.lean[1], both.plain[1]):
        conn.max_inbound_frame_size = max(conn.max_inbound_frame_size, len(inner))
    _read_by_both(both, first)
    _read_by_both(both, second)


def test_a_frame_over_the_size_limit_fails_both_paths_alike() -> None:
    both = _Both()
    wire = _warm(both)
    head_end = 9 + int.from_bytes(wire[:3], "big")
    big = b"x" * (both.lean[1].max_inbound_frame_size + 1)
    _read_by_both(both, wire[:head_end] + _frame(0x0, 0x1, 5, big))


def test_a_new_stream_on_an_id_the_server_reset_fails_both_paths_alike() -> None:
    """h2 answers frames on a stream it reset with RST_STREAM, not a connection error."""
    both = _Both()
    wire = _warm(both)
    head = wire[: 9 + int.from_bytes(wire[:3], "big")]
    _read_by_both(both, head)  # stream 5 opened, its body not sent yet
    both.call(1, "reset_stream", 5)
    both.call(1, "data_to_send")
    both.send(0, 7, GET, b"")  # a new stream: h2 forgets the closed ones as it counts
    both.deliver(0, [])
    assert 5 not in both.lean[1].streams
    _read_by_both(both, head)


@pytest.mark.parametrize(("announced", "size"), [(16384, 20000), (131072, 100000)])
def test_a_settings_ack_before_the_run_does_not_move_its_frame_size_limit(
    announced: int, size: int
) -> None:
    """h2 checks a whole read against the limit in force when it arrived, even when a
    SETTINGS ACK in it changes the limit."""
    both = _Both()
    both.call(0, "send_headers", 1, POST)  # a body to follow
    both.deliver(0, [])
    both.call(1, "update_settings", {SettingCodes.MAX_FRAME_SIZE: announced})
    both.call(1, "data_to_send")
    _read_by_both(both, _frame(0x4, 0x1, 0, b"") + _frame(0x0, 0x0, 1, b"x" * size))


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(b":method", b"GET"), (b":method", b"HEAD"), *POST[1:4]], id="two methods"),
        pytest.param([(":method", "POST"), *POST[1:4]], id="str fields"),
        pytest.param([*POST, (b"authorization", b"secret", True)], id="a sensitive triple"),
        pytest.param([*POST, (b"x-bin", b"\n" * 5000)], id="a block Huffman coding makes too big"),
    ],
)
def test_odd_header_lists_are_sent_as_h2_sends_them(headers: list[Any]) -> None:
    """Fields h2 would convert, pick from or code longer: the same bytes and state, or
    the lean path steps aside. Connections without the HPACK caches (hpack's own
    encoder, which Huffman-codes every literal) are compared too."""
    for cached, settled in itertools.product((True, False), (True, False)):
        both = _Both(settled)  # unsettled: the server's larger frame size not known yet
        if not cached:
            for pair in (both.lean, both.plain):
                pair[0].encoder = Encoder()
        both.send(0, 1, headers, b"")
        both.deliver(0, [])


def test_header_lists_h2_would_not_take_are_left_to_it() -> None:
    client = _pair()[0]
    before = _h2fast._state(client)
    assert _h2fast.send_message(client, 1, [], b"") is False
    assert _h2fast.send_message(client, 1, (field for field in GET), b"") is False  # type: ignore[arg-type]
    assert _h2fast._state(client) == before


def test_a_body_given_as_a_view_is_sent_as_its_bytes() -> None:
    """The bridge hands over the app's body as it came; a view of wider items is its bytes."""
    body = memoryview(array.array("H", [1, 2, 3]))
    both = _Both()
    both.send(0, 1, GET, b"")
    both.deliver(0, [])
    lean_server, plain_server = both.lean[1], both.plain[1]
    assert _h2fast.send_message(lean_server, 1, [(b":status", b"200")], body)  # type: ignore[arg-type]
    plain_server.send_headers(1, [(b":status", b"200")])
    plain_server.send_data(1, body.cast("B"), end_stream=True)
    assert _h2fast._state(lean_server) == _h2fast._state(plain_server)


def test_a_body_over_the_flow_control_window_is_left_to_h2() -> None:
    """h2 refuses to send past the window (FlowControlError); the lean path steps aside."""
    both = _Both()
    both.call(1, "update_settings", {SettingCodes.INITIAL_WINDOW_SIZE: 100})
    both.deliver(1, [])  # the client's new streams may now take 100 bytes
    both.deliver(0, [])  # (its ACK)
    both.send(0, 1, POST, b"x" * 100)  # fits: the lean path sends it
    assert both.taken["send"] == 1
    with pytest.raises(_Ended):
        both.send(0, 3, POST, b"x" * 101)  # both refuse, alike
    assert both.taken["send"] == 1


def _sent(both: _Both, side: int = 1) -> bytes:
    """What the servers (`side` 0: clients) queued, the same on both, taken from them."""
    wire = both.lean[side].data_to_send()
    assert wire == both.plain[side].data_to_send()
    return wire


def test_a_body_short_of_its_content_length_ends_the_connection_as_h2_does() -> None:
    both = _Both()
    head = [*POST, (b"content-length", b"3")]
    for i, body in enumerate([b"hi!", b"hi"]):  # a new block, then one the cache knows
        both.call(0, "send_headers", 1 + 2 * i, head)
        both.call(0, "send_data", 1 + 2 * i, body, True)
        outcome = _read_by_both(both, _sent(both, 0), lean=True)
    assert outcome == ("error", "InvalidBodyLengthError")
    assert _sent(both)[3:4] == b"\x07"  # a GOAWAY went out


def test_the_self_check_turns_the_path_off_when_h2_would_differ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lean path that forgets one window update fails the import-time comparison."""
    original = _h2fast.send_message

    def forgetful(conn: H2Connection, stream_id: int, headers: Any, body: bytes) -> bool:
        window = conn.outbound_flow_control_window
        sent = original(conn, stream_id, headers, body)
        conn.outbound_flow_control_window = window
        return sent

    monkeypatch.setattr(_h2fast, "send_message", forgetful)
    try:
        assert _h2fast._check() is False
        assert not _h2fast.ENABLED
        assert _h2fast.send_message(_pair()[0], 1, POST, b"") is False
    finally:
        monkeypatch.undo()
        assert _h2fast._check() is True


def test_a_connection_that_rewrites_or_checks_fields_keeps_h2s_own_send() -> None:
    """h2 would lowercase names and mark secrets never-indexed: only h2 may send then."""
    from h2.config import H2Configuration

    options = ("normalize_outbound_headers", "validate_outbound_headers")
    for on, off in (options, options[::-1]):
        client = H2Connection(H2Configuration(client_side=True, **{on: True, off: False}))
        client.initiate_connection()
        client.send_headers(1, GET, end_stream=True)  # out of IDLE: the lean path could go
        assert _h2fast.send_message(client, 3, GET, b"") is False
        assert 3 not in client.streams
