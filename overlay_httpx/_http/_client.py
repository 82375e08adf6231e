"""A small HTTP/2 client connection (prior knowledge) over one overlay stream.

One connection per (peer, port) multiplexes every concurrent request to it.
There is no background task: whichever request task needs input reads the
overlay stream and hands each h2 event to the request it belongs to, so the
connection works under any caller and leaves nothing running when idle.
Unlike httpcore, a response that is closed or abandoned before its end
resets its HTTP/2 stream (RST_STREAM CANCEL), so the server stops producing
it at once.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Final

import anyio
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import SettingsFrame

from .. import _h2compat, _h2fast  # _h2compat also gives DATA frames a cheap repr on import
from .._address import Address
from .._exceptions import PeerRestarted
from .._fields import H2_FIELD_NAME, connection_specific, field_name_ok, field_value_ok
from .._identity import PublicIdentity
from .._node import OverlayAttribute, OverlayStream
from ._errors import ConnectionLost, InvalidRequestHeader, MalformedResponse, ServerResetStream

__all__ = [
    "Abandoned",
    "H2ClientConnection",
    "Refused",
    "ResponseHead",
    "prepare_connection",
]

logger = logging.getLogger("overlay_httpx")

_RECEIVE_SIZE: Final = 256 << 10
_STREAM_WINDOW: Final = 4 << 20  # per response: what the server may send before we read
_CONNECTION_WINDOW: Final = 16 << 20
_MAX_FRAME: Final = 256 << 10
_SEND_BATCH: Final = 256 << 10  # request body bytes framed before one write to the stream
_SETTINGS_ACK: Final = SettingsFrame(0, flags=["ACK"]).serialize()
#: concurrent streams assumed until the server's SETTINGS say how many it takes (h2
#: would assume no limit; RFC 9113 section 6.5.2 recommends servers allow 100)
_STREAMS_BEFORE_SETTINGS: Final = 100


# h2 neither checks nor rewrites header blocks: `_request_fields` and `_head` do, per
# field in C (see `_fields`), and a malformed response fails its own request only.
_CONFIG: Final = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)
#: fields HPACK must never index, as h2 marks them when it normalises (RFC 7541 section 7.1.3)
_SECRET: Final = frozenset({b"authorization", b"proxy-authorization"})
_STATUS: Final = re.compile(rb"[0-9]{3}")


def _new_h2() -> h2.connection.H2Connection:
    """A client connection's h2 state, with its preface and SETTINGS queued: they
    leave with the first request, in one datagram."""
    conn = h2.connection.H2Connection(config=_CONFIG)
    settings = h2.settings.Settings(
        client=True,
        initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: _MAX_FRAME,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 << 10,
        },
    )
    _h2compat.use_local_settings(conn, settings, _MAX_FRAME)
    _h2compat.cache_hpack(conn)
    conn.initiate_connection()
    conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
    return conn


_spares: Final = _h2compat.Spares(_new_h2)


def prepare_connection() -> None:
    """Make the next new connection's h2 state now, off that connection's critical path.

    A transport calls this when it is created and, once its node is quiet, after
    a connection took the last one, so a first request to a new peer finds it
    ready (see `_h2compat.Spares`).
    """
    _spares.prepare()


class Refused(Exception):
    """The server did not begin this request (GOAWAY past it, or REFUSED_STREAM): retryable."""


class Abandoned(Refused):
    """We gave the connection up before any of its bytes left (`abandon`): the request
    was never sent and its body never read, so it may simply go on another connection."""


class ResponseHead:
    """Status and headers of a response, as they arrived."""

    __slots__ = ("headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.headers = headers


class _Exchange:
    """One request/response on one HTTP/2 stream."""

    __slots__ = ("body_sent", "chunks", "ended", "error", "head", "offset", "stream_id")

    def __init__(self, stream_id: int, offset: int, body_sent: bool) -> None:
        self.stream_id = stream_id
        self.offset = offset  # overlay stream offset before any of this request's bytes
        self.body_sent = body_sent  # the whole body went with the head (`open`)
        self.head: ResponseHead | None = None
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.ended = False
        self.error: Exception | None = None

    def body_ready(self) -> bool:
        """Body bytes, the end or an error is there: reading it would not wait."""
        return bool(self.chunks) or self.ended or self.error is not None


class H2ClientConnection:
    """HTTP/2 client side of one overlay stream."""

    def __init__(
        self, stream: OverlayStream, *, authority: str, keepalive_expiry: float | None = None
    ) -> None:
        self._stream = stream
        self.authority = authority
        self._keepalive_expiry = keepalive_expiry
        self._idle_since = time.monotonic()
        self.peer: Address = stream.extra(OverlayAttribute.peer_address)
        self.peer_identity: PublicIdentity = stream.extra(OverlayAttribute.peer_identity)
        self.fingerprint = self.peer_identity.fingerprint  # a hash: once, not per response
        self._h2 = _spares.take()
        self._exchanges: dict[int, _Exchange] = {}
        self._outgoing = bytearray()
        self._sending = False
        self._reading = False
        self._progress = anyio.Event()
        self._failure: Exception | None = None
        self._goaway_last: int | None = None
        self._closed = False
        self._settings_received = False

    # -- state ---------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """New requests may start here (not closed, not going away, not failed)."""
        return (
            not self._closed
            and self._failure is None
            and self._goaway_last is None
            and not self._stream.broken
            and not self._expired()
        )

    def _expired(self) -> bool:
        """Idle past the keep-alive expiry: replaced rather than reused, so a request
        never races the server's idle GOAWAY (``serve(idle_timeout=60)``)."""
        expiry = self._keepalive_expiry
        return expiry is not None and self.idle and time.monotonic() - self._idle_since >= expiry

    @property
    def idle(self) -> bool:
        return not self._exchanges

    @property
    def overlay_stream(self) -> OverlayStream:
        return self._stream

    def can_open(self) -> bool:
        """A request can start here without waiting for a stream slot."""
        return self.usable and self._slot_free()

    def _slot_free(self) -> bool:
        limit = self._h2.remote_settings.max_concurrent_streams
        if not self._settings_received:
            limit = min(limit, _STREAMS_BEFORE_SETTINGS)
        return self._h2.open_outbound_streams < limit

    # -- IO ------------------------------------------------------------------------

    async def _flush(self) -> None:
        """Send what h2 has queued, in order, from whichever task is already sending.

        No lock: a lock's acquire is a checkpoint, an extra event-loop pass on
        every request. Output is taken from h2 synchronously and appended to one
        buffer; the task that finds nobody sending sends until it is empty.
        """
        self._outgoing += self._h2.data_to_send()
        if self._sending or not self._outgoing:
            return
        if self._stream.try_send(self._outgoing):  # it fits: no wait, nothing to cut short
            self._outgoing.clear()
            return
        self._sending = True
        try:
            while self._outgoing:
                data = bytes(self._outgoing)
                self._outgoing.clear()
                # A cancelled partial write would cut an h2 frame in two and
                # corrupt the connection for every request on it.
                with anyio.CancelScope(shield=True):
                    try:
                        await self._stream.send(data)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                        self._fail(exc)  # waiting exchanges see it
                        self._outgoing.clear()
        finally:
            self._sending = False

    async def _wait(self, done: Callable[[], bool]) -> None:
        """Read and dispatch input until `done()`; one waiting task reads for all."""
        while not done():
            if self._failure is not None:
                raise self._failure
            if self._reading:
                await self._progress.wait()
                continue
            # Before blocking on input, let out what earlier input asked for
            # (SETTINGS ACK, WINDOW_UPDATE, PING answers). Doing it here rather
            # than right after each read keeps it off a response's critical path.
            await self._flush()
            if self._reading or done():
                continue
            self._reading = True
            data = b""
            try:
                data = await self._stream.receive(_RECEIVE_SIZE)
            except anyio.EndOfStream:
                self._fail(ConnectionLost(f"{self.peer} closed the HTTP/2 connection"))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                self._fail(exc)
            finally:
                self._reading = False
                # Waiters must never be stranded: not by what `_feed` raises, and not
                # when this reader is cancelled (its timeout, or its caller's), which
                # leaves the reading to one of them.
                try:
                    if data:
                        self._feed(data)
                finally:
                    progress, self._progress = self._progress, anyio.Event()
                    progress.set()

    def _fail(self, error: Exception) -> None:
        """The connection is gone; each open exchange fails, or is marked retryable when
        the peer restarted before any of its bytes could have reached it."""
        if self._failure is None:
            self._failure = error
        delivered = error.delivered if isinstance(error, PeerRestarted) else None
        for exchange in self._exchanges.values():
            if exchange.error is None and not exchange.ended:
                if delivered is not None and exchange.offset >= delivered:
                    exchange.error = Refused(
                        f"{self.peer} restarted before it saw the request; request not begun"
                    )
                else:
                    exchange.error = error

    def _feed(self, data: bytes) -> None:
        try:
            events = _h2fast.receive_data(self._h2, data)
        except h2.exceptions.ProtocolError as exc:
            logger.debug("HTTP/2 protocol error from %s: %s", self.peer, exc)
            self._fail(exc)
            return
        exchanges = self._exchanges
        malformed: list[int] = []
        for event in events:
            sid = getattr(event, "stream_id", None)
            exchange = exchanges.get(sid) if sid is not None else None
            if isinstance(event, h2.events.DataReceived):
                if exchange is not None and exchange.error is None:
                    exchange.chunks.append((event.data, event.flow_controlled_length))
                elif event.flow_controlled_length:
                    self._h2.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            elif isinstance(event, h2.events.ResponseReceived):
                if exchange is not None:
                    try:
                        exchange.head = _head(event.headers)
                    except MalformedResponse as exc:
                        exchange.error = exc  # RFC 9113 section 8.1.1: a stream error
                        malformed.append(exchange.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                if exchange is not None:
                    exchange.ended = True
            elif isinstance(event, h2.events.StreamReset):
                if exchange is not None and not exchange.ended:
                    exchange.error = _reset_error(event, self.peer)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._on_goaway(event)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self._settings_received = True
        # After every event (a GOAWAY later in the same read may have closed h2's
        # connection state, or reopened it): reset what is still open.
        for sid in malformed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        last = event.last_stream_id if event.last_stream_id is not None else 0
        self._goaway_last = last
        if not event.error_code:
            # A graceful GOAWAY: responses up to `last` still come. h2 would refuse
            # every frame after a GOAWAY, so keep its state machine open; `usable`
            # (now False) stops new requests on this connection.
            self._h2.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        code = _code_name(event.error_code or 0)
        logger.debug("GOAWAY from %s: last stream %d, %s", self.peer, last, code)
        for sid, exchange in self._exchanges.items():
            if sid > last and exchange.error is None:
                exchange.error = Refused(f"{self.peer} is going away ({code}); request not begun")
            elif event.error_code and exchange.error is None and not exchange.ended:
                exchange.error = ConnectionLost(
                    f"{self.peer} ended the connection: {code}", event.error_code
                )

    @property
    def abandoned(self) -> Abandoned | None:
        """Why `abandon` gave the connection up (None if it did not)."""
        return self._failure if isinstance(self._failure, Abandoned) else None

    def abandon(self, reason: str) -> None:
        """Give the connection up if none of its bytes has left (its tunnel's handshake
        is still under way): they are dropped, so none ever reaches the server, and
        each request on it fails as never sent (`Abandoned`). Once the keys exist,
        or after a failed handshake (which left nothing to give up), it does nothing."""
        stream = self._stream
        if stream.established or stream.broken:
            return
        self._fail(Abandoned(f"{self.peer}: {reason}; request not sent"))
        self._outgoing.clear()
        self._stream.reset()

    def can_send_now(self, sid: int, size: int) -> bool:
        """`size` body bytes on stream `sid` fit the flow-control windows as they are."""
        return size <= self._h2.local_flow_control_window(sid)

    # -- requests -------------------------------------------------------------------

    async def open(
        self,
        method: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        *,
        has_body: bool,
        body: bytes | None = None,
    ) -> int:
        """Wait for a stream slot, send the request head; returns the stream id.

        `body`, the whole body when it is known, leaves with the head when it can
        go at once (`_h2fast`); `send_body` then only flushes.
        """
        head = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":authority", self.authority.encode()),
            (b":path", target),
        ]
        head += _request_fields(headers)  # a bad header fails now, before any wait
        if not (self.usable and self._slot_free()):
            await self._wait(lambda: self._slot_free() or not self.usable)
        if not self.usable:
            raise Refused(f"connection to {self.peer} is closing; request not begun")
        sid = self._h2.get_next_available_stream_id()
        try:
            body_sent = body is not None and _h2fast.send_message(self._h2, sid, head, body)
            if not body_sent:
                self._h2.send_headers(sid, head, end_stream=not has_body)
        except h2.exceptions.ProtocolError as exc:
            self._fail(exc)  # h2's state is unusable: take the connection out of the pool
            raise
        self._exchanges[sid] = _Exchange(sid, self._stream.bytes_sent, body_sent)
        if not has_body:
            await self._flush()  # else the head leaves with the first body bytes
        return sid

    async def send_body(
        self,
        sid: int,
        body: AsyncIterator[bytes] | bytes,
        write_timeout: float | None = None,
    ) -> None:
        """Send a request body within HTTP/2 flow control, then end the stream.

        `body` is the whole body, whose last DATA frame then carries END_STREAM,
        or chunks to send as they come, followed by an empty DATA frame with
        END_STREAM. `write_timeout` bounds each wait for the peer to take more
        (a write timeout).
        """
        exchange = self._exchanges[sid]
        if exchange.body_sent:
            pass  # it left with the head
        elif isinstance(body, bytes):
            sent = await self._send_chunk(exchange, body, bool(body), write_timeout, 0)
            if sent is not None and not body:
                self._h2.end_stream(sid)
        else:
            unflushed = 0
            async for chunk in body:
                sent = await self._send_chunk(exchange, chunk, False, write_timeout, unflushed)
                if sent is None:
                    break  # the server answered or reset early; stop uploading
                unflushed = sent
            else:
                if exchange.error is None and not exchange.ended:
                    self._h2.end_stream(sid)  # a small body: head, data and end in one datagram
        await self._flush()

    async def _send_chunk(
        self,
        exchange: _Exchange,
        chunk: bytes,
        end: bool,
        write_timeout: float | None,
        unflushed: int,
    ) -> int | None:
        """Frame one body chunk within flow control, END_STREAM on its last frame if `end`.

        Returns how many framed bytes are not written yet (they go out every
        `_SEND_BATCH`), or None if the exchange ended or failed first.
        """
        h2c = self._h2
        sid = exchange.stream_id
        view = memoryview(chunk)
        total = len(view)
        pos = 0
        while pos < total:
            if exchange.error is not None or exchange.ended:
                return None
            window = h2c.local_flow_control_window(sid)
            if window <= 0:
                with anyio.fail_after(write_timeout):
                    await self._flush()
                    unflushed = 0
                    await self._wait(
                        lambda: (
                            h2c.local_flow_control_window(sid) > 0
                            or exchange.error is not None
                            or exchange.ended
                        )
                    )
                continue
            n = min(total - pos, h2c.max_outbound_frame_size, window)
            data = chunk if n == total and type(chunk) is bytes else bytes(view[pos : pos + n])
            pos += n
            h2c.send_data(sid, data, end_stream=end and pos == total)
            unflushed += n
            if unflushed >= _SEND_BATCH:
                await self._flush()  # shielded: a frame is never cut (see _flush)
                unflushed = 0
        return unflushed

    async def receive_head(self, sid: int) -> ResponseHead:
        exchange = self._exchanges[sid]
        await self._wait(lambda: exchange.head is not None or exchange.error is not None)
        if exchange.head is None:
            assert exchange.error is not None
            if isinstance(exchange.error, MalformedResponse):
                # our RST_STREAM: now, not with whatever this connection sends next
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await self._flush()
            raise exchange.error
        return exchange.head

    def has_data(self, sid: int) -> bool:
        """`receive_data` would return without waiting for the peer."""
        exchange = self._exchanges.get(sid)
        return exchange is not None and exchange.body_ready()

    async def receive_data(self, sid: int) -> bytes | None:
        """The next piece of the response body, or None at its end."""
        exchange = self._exchanges[sid]
        await self._wait(exchange.body_ready)
        if exchange.chunks:
            parts = []
            acked = 0
            while exchange.chunks:
                data, flow = exchange.chunks.popleft()
                parts.append(data)
                acked += flow
            if acked:
                self._h2.acknowledge_received_data(acked, sid)
                # After the last piece only a connection WINDOW_UPDATE would matter (the
                # stream is closed). A lone SETTINGS ACK (on a new connection, for the
                # server's SETTINGS that came with the response) waits for our next
                # write or for `aclose`, saving a datagram inside the request's time.
                self._outgoing += self._h2.data_to_send()
                if not (exchange.ended and self._outgoing in (b"", _SETTINGS_ACK)):
                    await self._flush()
            return b"".join(parts)
        if exchange.error is not None:
            raise exchange.error
        return None

    async def finish(self, sid: int) -> None:
        """Forget the exchange; if the response did not end, reset its stream (CANCEL)."""
        exchange = self._exchanges.pop(sid, None)
        if exchange is None:
            return
        if not self._exchanges:
            self._idle_since = time.monotonic()
        if exchange.ended or exchange.error is not None or self._failure is not None:
            return
        try:
            self._h2.reset_stream(sid, ErrorCodes.CANCEL)
        except h2.exceptions.ProtocolError:
            return  # already closed on the h2 level
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
            await self._flush()

    async def aclose(self) -> None:
        """Say GOAWAY and close the overlay stream (during its tunnel's handshake:
        drop what waits for the keys instead, so that nothing leaves after this)."""
        if self._closed:
            return
        self._closed = True
        self.abandon("the connection was closed during its handshake")
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
            if self._failure is None:
                try:
                    self._h2.close_connection()
                    await self._flush()
                except (h2.exceptions.ProtocolError, anyio.BrokenResourceError):
                    pass
            await self._stream.aclose()
        self._fail(ConnectionLost(f"connection to {self.peer} closed"))


def _request_fields(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A request's own fields as HTTP/2 carries them.

    Names lowercased, hop-by-hop fields dropped (and ``host``: ``:authority``
    says it), values trimmed; credentials marked never-indexed, so that HPACK
    keeps them out of its tables, as h2 would mark them. A field HTTP/2 cannot
    carry raises `InvalidRequestHeader`.
    """
    fields: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        name = name.lower()
        if name == b"host" or connection_specific(name, value):
            continue
        value = value.strip(b" \t")
        if not field_name_ok(name):
            raise InvalidRequestHeader(f"header name {name!r}: expected a token (RFC 9110)")
        if not field_value_ok(value):
            raise InvalidRequestHeader(f"header {name.decode()!r}: its value holds NUL, CR or LF")
        if name in _SECRET or (name == b"cookie" and len(value) < 20):
            fields.append(NeverIndexedHeaderTuple(name, value))
        else:
            fields.append((name, value))
    return fields


def _head(headers: list[tuple[bytes, bytes]]) -> ResponseHead:
    """Status and fields of a response header block; `MalformedResponse` if RFC 9113
    (section 8.3.2 and 8.2) does not allow it."""
    status = None
    fields: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name[:1] == b":":
            if name != b":status" or status is not None or fields:
                raise MalformedResponse(f"unexpected or misplaced pseudo-header {name!r}")
            if _STATUS.fullmatch(value) is None:
                raise MalformedResponse(f"invalid :status {value!r}")
            status = int(value)
            continue
        if H2_FIELD_NAME.fullmatch(name) is None or not field_value_ok(value):
            raise MalformedResponse(f"invalid header {name!r}: {value!r}")
        if connection_specific(name, value):
            raise MalformedResponse(f"connection-specific header {name!r}")
        fields.append((name, value))
    if status is None:
        raise MalformedResponse("no :status")
    return ResponseHead(status, fields)


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error {code:#x}"


def _reset_error(event: h2.events.StreamReset, peer: Address) -> Exception:
    name = _code_name(event.error_code)
    if event.error_code == ErrorCodes.REFUSED_STREAM:
        return Refused(f"{peer} refused stream {event.stream_id}; request not begun")
    return ServerResetStream(
        f"{peer} reset HTTP/2 stream {event.stream_id} ({name})", event.error_code
    )
