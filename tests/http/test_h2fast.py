"""The lean HTTP/2 path leaves h2 exactly as h2's own calls do, and steps aside otherwise.

Two client/server pairs, made as the transport and the bridge make theirs, go
through the same exchanges: one through `_h2fast` wherever it takes them, one
through h2 alone. Every byte sent, every event and h2's state must agree.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import pytest
from h2.connection import H2Connection
from h2.events import Event
from h2.exceptions import ProtocolError
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


def _pair() -> tuple[H2Connection, H2Connection]:
    client = client_side._new_h2()
    server = server_side._new_h2(100, 65536)
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

    def __init__(self) -> None:
        self.lean, self.plain = _pair(), _pair()
        self.taken: set[str] = set()

    def send(
        self, side: int, stream_id: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        def lean(conn: H2Connection) -> None:
            if _h2fast.send_message(conn, stream_id, headers, body):
                self.taken.add("send")
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
        wires = [pair[side].data_to_send() for pair in (self.lean, self.plain)]
        assert wires[0] == wires[1]
        wire = wires[0]
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
                        self.taken.add("receive")
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


def test_a_steady_exchange_takes_the_lean_path_both_ways() -> None:
    both = _Both()
    for i in range(6):
        stream_id = 1 + 2 * i
        both.send(0, stream_id, [*POST, (b"content-length", b"16")], b'{"prompt": "hi"}')
        events = both.deliver(0, [])
        assert [type(e).__name__ for e in events] == [
            "RequestReceived",
            "DataReceived",
            "StreamEnded",
        ]
        both.send(1, stream_id, [(b":status", b"200"), (b"content-length", b"2")], b"ok")
        events = both.deliver(1, [])
        assert [type(e).__name__ for e in events][:1] == ["ResponseReceived"]
    assert both.taken == {"send", "receive"}


_REQUESTS = st.sampled_from([POST, GET, HEAD])
_SIZES = st.sampled_from([0, 1, 17, 300, 16_384, 16_385, 40_000])
_STATUSES = st.sampled_from([b"200", b"204", b"404", b"103"])


@fuzz_settings(200)
@given(data=st.data())
def test_any_exchange_leaves_h2_as_h2_would(data: st.DataObject) -> None:
    both = _Both()
    for stream_id in (1, 3, 5):  # warm: the third of these takes the lean path both ways
        both.send(0, stream_id, POST, b"")
        both.deliver(0, [])
        both.send(1, stream_id, [(b":status", b"200")], b"ok")
        both.deliver(1, [])
    assert both.taken == {"send", "receive"}
    with contextlib.suppress(_Ended):
        _exchanges(both, data)


def _exchanges(both: _Both, data: st.DataObject) -> None:
    next_id, waiting = 7, []
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


@fuzz_settings(300)
@given(garbage=st.binary(max_size=200), prefix=st.booleans())
def test_garbage_fails_both_paths_alike(garbage: bytes, prefix: bool) -> None:
    """A broken read: the same error (or the same events) and the same GOAWAY either way."""
    both = _Both()
    for i in range(3):  # warm the caches so the lean path would take a known block
        both.send(0, 1 + 2 * i, [*POST, (b"content-length", b"2")], b"hi")
        both.deliver(0, [])
    both.send(0, 7, [*POST, (b"content-length", b"2")], b"hi")
    wire = both.lean[0].data_to_send()
    both.plain[0].data_to_send()
    read = (wire if prefix else b"") + garbage
    outcomes = []
    for conn, fast in ((both.lean[1], True), (both.plain[1], False)):
        try:
            events = _h2fast.receive(conn, read) if fast else None
            if events is None:
                events = conn.receive_data(read)
            outcomes.append(("events", _events(events)))
        except ProtocolError as exc:
            outcomes.append(("error", type(exc).__name__))
        outcomes.append(_h2fast._state(conn))
    assert outcomes[:2] == outcomes[2:]


def test_a_body_short_of_its_content_length_ends_the_connection_as_h2_does() -> None:
    both = _Both()
    head = [*POST, (b"content-length", b"3")]
    for i, body in enumerate([b"hi!", b"hi!", b"hi"]):  # the third one's block is cached
        both.call(0, "send_headers", 1 + 2 * i, head)
        both.call(0, "send_data", 1 + 2 * i, body, True)
        wire = both.lean[0].data_to_send()
        assert wire == both.plain[0].data_to_send()
        outcomes = []
        for conn, fast in ((both.lean[1], True), (both.plain[1], False)):
            try:
                events = _h2fast.receive(conn, wire) if fast else None
                if events is None:
                    assert not (fast and i == 2), "the cached block took h2's path"
                    events = conn.receive_data(wire)
                outcomes.append(_events(events))
            except ProtocolError as exc:
                outcomes.append(type(exc).__name__)
            outcomes.append(conn.data_to_send())
        assert outcomes[:2] == outcomes[2:]
    assert outcomes[0] == "InvalidBodyLengthError"
    assert outcomes[1][3:4] == b"\x07"  # a GOAWAY went out


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
