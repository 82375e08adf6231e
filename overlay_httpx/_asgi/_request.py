"""One HTTP/2 request run through the ASGI app: its `receive` and `send`.

The connection hands each request the body chunks h2 reports; the app pulls
them with `receive()`, and only then are they acknowledged to h2, so a slow
app holds the client back by flow control rather than growing a buffer here.
`send()` turns response messages into h2 calls and waits for the client's h2
window, so a streaming response never runs ahead of the client either.

Response headers wait for the first ``http.response.body`` message and go out
in the same write (as uvicorn does), so a small response is one write; an app
that wants its headers out at once sends an empty body with ``more_body``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Final

import anyio
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError

from .. import _h2fast
from .._exceptions import ClientDisconnected
from .._fields import CONNECTION_HEADERS, field_name_ok, field_value_ok
from ._types import Message, Scope

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["Request", "ResponseHeads", "simple_response"]

logger = logging.getLogger("overlay_httpx")

#: the most body bytes queued in h2 before they are written out (bounds our buffer)
MAX_BATCH: Final = 512 * 1024


def simple_response(connection: Connection, stream_id: int, status: int, text: str) -> None:
    """Queue a complete short plain-text response (errors the server itself answers)."""
    h2 = connection.h2
    body = text.encode()
    if h2.local_flow_control_window(stream_id) < len(body):
        body = b""  # the client left no window: the status alone must do
    headers = [
        (b":status", str(status).encode()),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    h2.send_headers(stream_id, headers, end_stream=not body)
    if body:
        h2.send_data(stream_id, body, end_stream=True)


def _response_headers(message: Message) -> tuple[int, list[tuple[bytes, bytes]], int | None]:
    """Status, h2 header list and declared content-length of ``http.response.start``.

    A malformed start message is the app's error (it raises in the app's `send`).
    """
    status = message["status"]
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise ValueError(f"ASGI response status {status!r}: expected an int in 200..599")
    headers = [(b":status", str(status).encode())]
    length: int | None = None
    for name, value in message.get("headers", ()):
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise TypeError(f"ASGI response header {name!r}: {value!r}: expected bytes")
        name = name.lower()
        if name in CONNECTION_HEADERS:
            continue  # meaningless in HTTP/2, and forbidden there
        value = value.strip(b" \t")
        if not field_name_ok(name) or not field_value_ok(value):
            raise ValueError(f"invalid ASGI response header {name!r}: {value!r}")
        if name == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise ValueError(f"invalid ASGI response content-length {value!r}")
            length = int(value)
        headers.append((name, value))
    return status, headers, length


#: a response head as `ResponseHeads` remembers it: status, h2 header list, content-length
_Head = tuple[int, tuple[tuple[bytes, bytes], ...], int | None]


class ResponseHeads:
    """`_response_headers` for the responses of one connection, remembering its results.

    An app tends to answer with the same few heads; checking and lowercasing
    each header is a good part of a small response's cost. Only heads made of
    an int status and a list or tuple of ``(bytes, bytes)`` tuples are
    remembered (anything else might compare equal to a valid head without being
    one), never a head that fails the checks, and at most `MAX_REMEMBERED`
    heads. Every call returns a new header list.
    """

    MAX_REMEMBERED: Final = 32
    _MAX_FIELDS: Final = 32

    __slots__ = ("_heads",)

    def __init__(self) -> None:
        self._heads: dict[tuple[int, tuple[tuple[bytes, bytes], ...]], _Head] = {}

    def get(self, message: Message) -> tuple[int, list[tuple[bytes, bytes]], int | None]:
        """Like ``_response_headers(message)``."""
        status = message["status"]
        fields = message.get("headers", ())
        if (
            type(status) is not int
            or type(fields) not in (list, tuple)
            or len(fields) > self._MAX_FIELDS
        ):
            return _response_headers(message)
        for field in fields:
            if (
                type(field) is not tuple
                or len(field) != 2
                or type(field[0]) is not bytes
                or type(field[1]) is not bytes
            ):
                return _response_headers(message)
        key = (status, tuple(fields))
        head = self._heads.get(key)
        if head is not None:
            return status, list(head[1]), head[2]
        status, headers, length = _response_headers(message)  # raises: never remembered
        if len(self._heads) >= self.MAX_REMEMBERED:
            self._heads.clear()
        self._heads[key] = (status, tuple(headers), length)
        return status, headers, length


class Request:
    """The state of one request: body in, response out, and who ended what."""

    __slots__ = (
        "_readable",
        "_writable",
        "app_done",
        "blocked_since",
        "body",
        "body_delivered",
        "body_ended",
        "complete",
        "connection",
        "dropped",
        "gone",
        "headers_sent",
        "listened",
        "no_body",
        "pending_headers",
        "received",
        "receivers",
        "remaining",
        "scope",
        "started",
        "stream_closed",
        "stream_id",
        "unacked",
    )

    def __init__(self, connection: Connection, stream_id: int, scope: Scope) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.scope = scope
        self.body: list[bytes] = []
        self.unacked = 0  # flow-controlled bytes received but not yet handed to the app
        self.received = 0  # body bytes received in all
        self.body_ended = False  # the client's END_STREAM arrived
        self.body_delivered = False  # the app got more_body=False
        self.started = False  # the app sent http.response.start
        self.pending_headers: list[tuple[bytes, bytes]] | None = None
        self.no_body = False  # HEAD, 204, 304: whatever body the app sends is dropped
        self.remaining: int | None = None  # body bytes the content-length still promises
        self.headers_sent = False
        self.complete = False  # our END_STREAM is queued
        self.gone = False  # reset by either side, or the connection is lost
        self.listened = False  # a receive() was waiting when the stream went away
        self.dropped = False  # a send was dropped since (see `_disconnected`)
        self.receivers = 0  # receive() calls waiting now
        self.stream_closed = False  # counted out of the connection's open streams
        self.app_done = False
        self.blocked_since = 0.0  # when the app last began to wait for send window
        self._readable: anyio.Event | None = None
        self._writable: anyio.Event | None = None

    # -- what the connection calls ---------------------------------------------------------

    def on_data(self, data: bytes, flow_controlled_length: int) -> None:
        if data:
            self.body.append(data)
            self.received += len(data)
        self.unacked += flow_controlled_length
        self._wake_reader()

    def on_end(self) -> None:
        """The client's END_STREAM."""
        self.body_ended = True
        if self.complete:
            self.close_stream()
        self._wake_reader()

    def on_gone(self) -> None:
        """The stream was reset (by either side) or the connection is lost."""
        if self.gone:
            return
        self.gone = True
        self.listened = self.receivers > 0
        self.close_stream()
        self._wake_reader()
        self.wake_writer()

    @property
    def starved(self) -> bool:
        """The app waits in ``receive()`` for body data the client has stopped sending.

        Everything received has been handed over (and its window given back),
        and the connection's window is open: other requests' apps holding it
        all unread would stop the client too, through no fault of its own.
        So only the client can be holding things up.
        """
        return (
            self.receivers > 0
            and not self.body
            and not self.body_ended
            and not self.gone
            and self.connection.h2.inbound_flow_control_window > 0
        )

    def close_stream(self) -> None:
        if not self.stream_closed:
            self.stream_closed = True
            self.connection.open_streams -= 1

    def wake_writer(self) -> None:
        event = self._writable
        if event is not None:
            self._writable = None
            event.set()

    def _wake_reader(self) -> None:
        event = self._readable
        if event is not None:
            self._readable = None
            event.set()

    def _finish_local(self) -> None:
        """Our END_STREAM is queued: the response is complete."""
        self.complete = True
        if self.body_ended:
            self.close_stream()
        self._wake_reader()  # receive() now says http.disconnect

    def _reset(self, code: ErrorCodes) -> None:
        connection = self.connection
        if not self.gone and not connection.dead:
            with contextlib.suppress(ProtocolError):
                connection.h2.reset_stream(self.stream_id, code)
        self.on_gone()

    # -- ASGI ----------------------------------------------------------------------------------

    async def receive(self) -> Message:
        """The next ``http.request`` body chunk, or ``http.disconnect``."""
        while True:
            if self.gone:
                return {"type": "http.disconnect"}
            if self.body or (self.body_ended and not self.body_delivered):
                chunks = self.body
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self.body = []
                more = not self.body_ended
                self.body_delivered = not more
                if self.unacked:
                    await self._acknowledge(more)
                return {"type": "http.request", "body": data, "more_body": more}
            if self.complete:
                return {"type": "http.disconnect"}
            event = self._readable
            if event is None:
                event = self._readable = anyio.Event()
            self.receivers += 1
            try:
                await event.wait()
            finally:
                self.receivers -= 1

    async def _acknowledge(self, more: bool) -> None:
        """Give the client back the window of what the app has now read.

        While the body goes on, the WINDOW_UPDATEs go out at once. After its
        last chunk only the connection's window matters, and only when h2
        decided to grow it now; otherwise what is queued (on a new connection,
        our SETTINGS and their ACK) waits for the next write, normally the
        response, so that a small response takes one datagram, not two.
        """
        connection = self.connection
        h2 = connection.h2
        window = h2.inbound_flow_control_window
        h2.acknowledge_received_data(self.unacked, self.stream_id)
        self.unacked = 0
        if more or h2.inbound_flow_control_window != window:
            await connection.flush(wait=False)

    async def send(self, message: Message) -> None:
        """Turn one ASGI response message into h2 frames and write them."""
        kind = message["type"]
        if kind == "http.response.body":
            if not self.started:
                raise RuntimeError("ASGI http.response.body before http.response.start")
            if self.complete:
                raise RuntimeError("ASGI http.response.body after the response completed")
            if self.gone:
                await self._disconnected()
                return
            more = bool(message.get("more_body", False))
            try:
                await self._send_body(message.get("body", b""), more)
            except ProtocolError as exc:  # h2 refused: the stream closed under us
                logger.debug("stream %d: h2 refused a send: %s", self.stream_id, exc)
                self.on_gone()
            if self.gone and more:
                await self._disconnected()
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("ASGI http.response.start sent twice")
            status, self.pending_headers, length = self.connection.response_heads.get(message)
            self.no_body = status in (204, 304) or self.scope["method"] == "HEAD"
            self.remaining = None if self.no_body else length
            self.started = True
            if self.gone:
                await self._disconnected()
        else:
            raise RuntimeError(f"unexpected ASGI message type {kind!r} for an http scope")

    async def _disconnected(self) -> None:
        """`send` after the stream went away: raise, unless the app listens for it.

        An app that had a `receive()` waiting when the stream went away (as
        Starlette's streaming responses do) learns of it there and stops
        itself; raising in `send` as well would unwind its body generator from
        outside, leaving it suspended (its ``finally`` would wait for the
        garbage collector). The first such send is dropped without a checkpoint,
        so the cancellation lands in the generator's own await; later ones are
        a checkpoint, where it lands for a generator that awaits nothing of its
        own (it would spin on dropped sends for ever). Any other app gets
        `ClientDisconnected`, an `OSError`, as ASGI 2.4 has servers do.
        """
        if not self.listened:
            raise ClientDisconnected(f"HTTP/2 stream {self.stream_id} is gone")
        if self.dropped:
            await anyio.lowlevel.checkpoint()
        self.dropped = True

    async def _send_body(self, body: bytes, more: bool) -> None:
        connection = self.connection
        h2 = connection.h2
        sid = self.stream_id
        end = not more
        if self.no_body:
            body = b""
        elif self.remaining is not None:
            # A client's h2 treats a length mismatch as an error of the whole
            # connection, so a wrong length must fail this response only.
            self.remaining -= len(body)
            if self.remaining < 0 or (end and self.remaining):
                raise RuntimeError("ASGI response body does not match its content-length")
        headers = self.pending_headers
        if headers is not None:
            self.pending_headers = None
            self.headers_sent = True
            if end and _h2fast.send_message(h2, sid, headers, body):
                self._finish_local()  # the whole response is queued, END_STREAM and all
                await connection.flush()
                return
            h2.send_headers(sid, headers, end_stream=end and not body)
        elif end and not body:
            h2.end_stream(sid)
        if body:
            view = memoryview(body).cast("B")
            total = len(view)
            pos = 0
            while True:
                window = h2.local_flow_control_window(sid)
                if window <= 0:
                    await connection.flush()  # what is queued goes out before we sleep
                    # The peer may have opened the window while that flush waited (its
                    # WINDOW_UPDATE found no one to wake): look again before sleeping.
                    if not self.gone and h2.local_flow_control_window(sid) <= 0:
                        await self._wait_writable()
                    if self.gone:
                        return
                    continue
                stop = min(total, pos + min(window, MAX_BATCH))
                frame = h2.max_outbound_frame_size
                while pos < stop:
                    size = min(frame, stop - pos)
                    pos += size
                    h2.send_data(sid, view[pos - size : pos], end_stream=end and pos == total)
                if pos == total:
                    break
                await connection.flush()
                if self.gone:
                    return
        if end:
            self._finish_local()
        await connection.flush()

    async def _wait_writable(self) -> None:
        blocked = self.connection.blocked
        event = self._writable
        if event is None:
            event = self._writable = anyio.Event()
        blocked.add(self)
        self.blocked_since = anyio.current_time()
        try:
            await event.wait()
        finally:
            blocked.discard(self)

    # -- when the app is done ------------------------------------------------------------------

    def app_failed(self, exc: Exception) -> None:
        """The app raised: 500 if nothing reached the wire yet, else reset the stream."""
        if self.gone:
            logger.debug(
                "ASGI app raised after stream %d went away: %r", self.stream_id, exc, exc_info=exc
            )
            return
        scope = self.scope
        logger.error(
            "exception in ASGI app for %s %s from %s",
            scope["method"],
            scope["path"],
            scope["client"][0],
            exc_info=exc,
        )
        self._fail()

    def app_returned(self) -> None:
        """The app returned: anything short of a complete response is an error."""
        if self.gone or self.complete:
            return
        what = "completing" if self.headers_sent else "starting"
        logger.error(
            "ASGI app returned without %s the response to %s %s",
            what,
            self.scope["method"],
            self.scope["path"],
        )
        self._fail()

    def _fail(self) -> None:
        if self.headers_sent:
            self._reset(ErrorCodes.INTERNAL_ERROR)
            return
        self.pending_headers = None
        try:
            simple_response(self.connection, self.stream_id, 500, "Internal Server Error")
        except ProtocolError:
            self.on_gone()
            return
        self.headers_sent = True
        self._finish_local()

    def finish(self) -> None:
        """The app task ended: give back unread window, and close the stream if still open."""
        self.app_done = True
        connection = self.connection
        if connection.dead:
            self.on_gone()
            return
        if self.unacked:
            with contextlib.suppress(ProtocolError):
                connection.h2.acknowledge_received_data(self.unacked, self.stream_id)
            self.unacked = 0
        if not self.stream_closed:
            # complete but the client is still sending: RFC 9113 8.1 says stop it, NO_ERROR
            self._reset(ErrorCodes.NO_ERROR if self.complete else ErrorCodes.CANCEL)
