"""One overlay stream from one peer: one HTTP/2 connection carrying many requests.

The reader feeds received bytes to a sans-IO `h2.connection.H2Connection` and
turns its events into request tasks (one task per request, the only task
spawned per request) and wake-ups. Every h2 call happens between awaits,
never across one. Every write goes through `flush`, which lets one task at a
time write to the stream: the task that finds the stream idle writes all that
h2 has queued (its own frames and anyone else's). When the overlay stream can
take all of it at once, that happens synchronously; otherwise in as few `send`
calls as possible, shielded from cancellation so that a cancelled app can never
leave half a frame on the wire, while others wait for it.

On a new connection our SETTINGS (and the ACK of the client's) are not written
on their own after the first read when it brought a request: the request's
response carries them if it is quick (one datagram instead of two), else a
flush that runs as soon as the request task first waits.

A peer that breaks the protocol gets a GOAWAY and loses this connection only.
Graceful shutdown sends a GOAWAY of our own making (h2 would stop all sending
after its own), refuses streams past it, and lets the rest finish.

Half-open connections and requests are reaped: when nothing has arrived from
the peer for `idle_timeout` seconds (nor has a request ended), a connection
with no requests gets a graceful GOAWAY and closes (this also ends streams
that never finished the preface), and a request whose app waits in
``receive()`` for a body that has stopped coming is reset, its app seeing
``http.disconnect``. Writes have the same limit, whatever else the peer
sends: a response that gets no flow-control window for `idle_timeout` is
reset, and a connection whose peer leaves a write (up to `TIMED_PIECE`)
unread that long is closed.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Final

import anyio
from anyio.abc import TaskGroup
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from .. import _h2compat, _h2fast  # _h2compat also gives DATA frames a cheap repr on import
from .._node import OverlayAttribute, OverlayStream
from ._request import Request, ResponseHeads, simple_response
from ._scope import BadRequest, ConnectionInfo, ScopeBuilder
from ._tasks import RequestTasks
from ._types import ASGIApp

__all__ = ["Connection", "prepare_h2"]

logger = logging.getLogger("overlay_httpx")

RECEIVE_SIZE: Final = 256 * 1024
#: what one request may send before the app reads it (SETTINGS_INITIAL_WINDOW_SIZE)
STREAM_WINDOW: Final = 1024 * 1024
#: what all requests of a connection together may send before the apps read it
CONNECTION_WINDOW: Final = 8 * 1024 * 1024
MAX_FRAME_SIZE: Final = 64 * 1024
#: how long closing waits to deliver its last frames to a peer that does not read
CLOSE_TIMEOUT: Final = 1.0
#: with an idle timeout, a write is timed in pieces of at most this many bytes: one
#: that the peer has not taken after `idle_timeout` seconds ends the connection
TIMED_PIECE: Final = 1 << 20
#: what the peer's frames may make us owe it (PING and SETTINGS ACKs, resets,
#: refusals) while a writer waits for it to read, before we stop reading too
READER_OUTPUT_LIMIT: Final = 64 * 1024
_DEFAULT_WINDOW: Final = 65535

_H2_CONFIG: Final = H2Configuration(
    client_side=False,
    header_encoding=None,
    # Checked per request in `_scope` (400, not a connection error) and in
    # `_request` for responses; h2's own checks would also cost a Python loop
    # per header character.
    validate_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)


class _ServerSettings(Settings):
    """Our SETTINGS, with h2's own concurrent-stream check moved out of the way.

    h2 answers a stream over SETTINGS_MAX_CONCURRENT_STREAMS with a GOAWAY for
    the whole connection; RFC 9113 section 5.1.2 allows refusing just that
    stream, which `Connection` does (REFUSED_STREAM, safe for clients to
    retry). So h2 checks against a ceiling far above the advertised value.
    """

    @property
    def max_concurrent_streams(self) -> int:
        return 2**31 - 1

    @max_concurrent_streams.setter
    def max_concurrent_streams(self, value: int) -> None:
        self[SettingCodes.MAX_CONCURRENT_STREAMS] = value


def _new_h2(max_concurrent_streams: int, max_header_list_size: int) -> H2Connection:
    """A server connection's h2 state, our preface SETTINGS and window already queued."""
    h2 = H2Connection(config=_H2_CONFIG)
    settings = _ServerSettings(
        client=False,
        initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
        },
    )
    _h2compat.use_local_settings(h2, settings, MAX_FRAME_SIZE)
    _h2compat.cache_hpack(h2)
    # Over the advertised size (up to twice) a request gets 431 from `build_scope`;
    # beyond that the HPACK decoder stops decoding, which can only end the connection.
    h2.decoder.max_header_list_size = 2 * max_header_list_size
    h2.initiate_connection()
    h2.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
    return h2


_spares: Final = _h2compat.Spares(_new_h2)


def prepare_h2(max_concurrent_streams: int, max_header_list_size: int) -> None:
    """Make the next new connection's h2 state now, off that connection's critical path.

    The server calls this when it starts and, once its node is quiet, after a
    connection took the last one, so a new client's first request finds it
    ready (see `_h2compat.Spares`; one spare per set of limits).
    """
    _spares.prepare(max_concurrent_streams, max_header_list_size)


class Connection:
    """Serves the requests of one overlay stream until the peer leaves or we shut down."""

    def __init__(
        self,
        stream: OverlayStream,
        app: ASGIApp,
        info: ConnectionInfo,
        *,
        max_concurrent_streams: int,
        idle_timeout: float | None = None,
    ) -> None:
        self._stream = stream
        self._app = app
        self._info = info
        self._max_streams = max_concurrent_streams
        self.h2 = _spares.take(max_concurrent_streams, info.max_header_list_size)
        self._scopes = ScopeBuilder(info)  # remembers the header lists it parsed
        self.response_heads = ResponseHeads()  # remembers the response heads it checked
        self.requests: dict[int, Request] = {}
        self.blocked: set[Request] = set()  # requests waiting for send window
        self.open_streams = 0  # h2 streams of ours not yet closed (the concurrency limit)
        self.dead = False  # nothing more can be written
        self._writing = False
        self._flushed: anyio.Event | None = None
        self._extra = b""  # frames h2 does not know about (our graceful GOAWAY)
        self._unsent = bytearray()  # taken from h2 while a writer waits; it goes first
        self._owed = 0  # bytes the peer's frames made us queue since the writer began
        self._first_flush_due = False  # the first read's frames wait for a request task
        self._task_group: TaskGroup | None = None
        self._request_tasks: RequestTasks | None = None
        self._read_scope: anyio.CancelScope | None = None
        self._stop_reading_now = False
        self._draining = False
        self._goaway_last: int | None = None
        self._peer = stream.extra(OverlayAttribute.peer_address)
        self._idle_timeout = idle_timeout
        self._last_active = 0.0  # anyio.current_time() of the last bytes in or request done
        self._send_since: float | None = None  # when the `send` under way began (if timed)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the peer leaves, the connection breaks or shutdown ends it; then close."""
        tasks: RequestTasks | None = None
        try:
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                tasks = self._request_tasks = RequestTasks(task_group)
                reaper = anyio.CancelScope()
                if self._idle_timeout is not None:
                    self._last_active = anyio.current_time()
                    task_group.start_soon(self._reap_idle, self._idle_timeout, reaper)
                # Our SETTINGS leave with the answer to the client's preface (the
                # client always speaks first), or with the first response (see
                # `_read_loop`): one datagram instead of two or three.
                with anyio.CancelScope() as scope:
                    self._read_scope = scope
                    if not self._stop_reading_now:
                        await self._read_loop()
                self._read_scope = None
                reaper.cancel()
                await tasks.wait()
        finally:
            self._task_group = None
            with anyio.CancelScope(shield=True):
                if tasks is not None and len(tasks):  # cancelled (abort, or from outside)
                    tasks.cancel()
                    await tasks.wait()
                await self._close()

    def start_shutdown(self) -> None:
        """Graceful shutdown: GOAWAY now, refuse newer streams, finish the rest."""
        if self._draining or self.dead:
            return
        self._draining = True
        last = self.h2.highest_inbound_stream_id
        self._goaway_last = last
        frame = GoAwayFrame(0)
        frame.last_stream_id = last
        frame.error_code = ErrorCodes.NO_ERROR
        self._extra += frame.serialize()
        if not self.requests:
            self._stop_reading()  # `run` closes, which writes the GOAWAY
        elif self._task_group is not None:
            self._task_group.start_soon(self.flush)

    def abort(self) -> None:
        """Shutdown ran out of time: reset every stream still open, cancel the apps, close."""
        for request in list(self.requests.values()):
            request._reset(ErrorCodes.CANCEL)
        if self._writing:
            # A writer is stuck in a send the peer is not reading: only a reset frees it.
            self._mark_dead("shutdown timed out while the peer was not reading")
            self._stream.reset()
        if self._request_tasks is not None:
            self._request_tasks.cancel()
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
        self._stop_reading()

    def _stop_reading(self) -> None:
        self._stop_reading_now = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    def _mark_dead(self, reason: str) -> None:
        """Nothing more can be written: every request sees http.disconnect."""
        if self.dead:
            return
        self.dead = True
        logger.debug("HTTP/2 connection from %s ended: %s", self._peer, reason)
        for request in list(self.requests.values()):
            request.on_gone()
        self._stop_reading()

    async def _close(self) -> None:
        """Write what is left (at most `CLOSE_TIMEOUT`), then close the overlay stream."""
        stream = self._stream
        if not self.dead and not self._writing:
            data = self._take()
            if data:
                with anyio.move_on_after(CLOSE_TIMEOUT) as scope:
                    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                        await stream.send(data)
                if scope.cancelled_caught:
                    stream.reset()
        self.dead = True
        await stream.aclose()

    async def _reap_idle(self, idle: float, scope: anyio.CancelScope) -> None:
        """Close the connection, or reset starved requests, once the peer falls silent;
        reset responses, or close the connection, once the peer stops reading."""
        with scope:
            while not self.dead:
                await anyio.sleep_until(self._next_reaping(idle))
                now = anyio.current_time()
                if self._send_since is not None and now >= self._send_since + idle:
                    # The peer has not read a piece of our writes for `idle`: nothing else
                    # can go out behind its half-written frames, so the connection goes.
                    self._mark_dead(f"the peer took no {TIMED_PIECE} bytes in {idle:g}s")
                    self._stream.reset()
                    return
                for request in list(self.blocked):
                    if now >= request.blocked_since + idle:
                        logger.debug(
                            "response on stream %d got no window for %gs: reset",
                            request.stream_id,
                            idle,
                        )
                        request._reset(ErrorCodes.CANCEL)
                if now >= self._last_active + idle:  # nothing arrived meanwhile
                    if not self.requests:
                        logger.debug(
                            "HTTP/2 connection from %s idle %gs: closing", self._peer, idle
                        )
                        self.start_shutdown()
                        return
                    for request in list(self.requests.values()):
                        if request.starved:
                            logger.debug(
                                "request on stream %d got no body for %gs: reset",
                                request.stream_id,
                                idle,
                            )
                            request._reset(ErrorCodes.CANCEL)
                    self._last_active = now
                await self.flush(wait=False)

    def _next_reaping(self, idle: float) -> float:
        """When the reaper must look next: the peer falling silent, a response or a
        write stalled since its start. Whatever starts to wait later is due later
        than the silence, so the reaper looks again in time."""
        due = self._last_active
        if self._send_since is not None:
            due = min(due, self._send_since)
        for request in self.blocked:
            due = min(due, request.blocked_since)
        return due + idle

    # -- reading -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        stream, h2 = self._stream, self.h2
        timed = self._idle_timeout is not None
        first = True
        while True:
            try:
                data = await stream.receive(RECEIVE_SIZE)
                if timed:
                    self._last_active = anyio.current_time()
            except anyio.EndOfStream:
                if self._first_flush_due:  # what the first read asked for goes out first
                    await self.flush(wait=False)
                self._mark_dead("the peer closed the stream")
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                self._mark_dead(f"the stream broke: {exc}")
                return
            requests = len(self.requests)
            writing = self._writing
            if writing:  # what is queued already is not the peer's doing: set it apart
                self._unsent += h2.data_to_send()
            try:
                events = _h2fast.receive_data(h2, data)
            except Exception as exc:  # ProtocolError, or whatever else garbage provokes
                self._protocol_error(exc)
            else:
                try:
                    self._handle(events)
                except Exception as exc:  # a bug of ours: lose this connection, not the server
                    logger.exception("HTTP/2 connection from %s failed", self._peer)
                    self._protocol_error(exc)
            if first and len(self.requests) > requests and self._task_group is not None:
                # The connection's first frames (SETTINGS, their ACK, WINDOW_UPDATE) wait
                # for the new request task's first step: a quick response takes them along.
                self._first_flush_due = True
                self._task_group.start_soon(self.flush, False)
            elif writing:
                # A writer waits for the peer to take what we sent. Read on (a peer
                # may read only after its own writes go through), but bound what its
                # frames make us owe meanwhile: a peer that floods PINGs and never
                # reads is then stopped by its flow control, as we stop reading.
                owed = h2.data_to_send()
                self._unsent += owed
                self._owed += len(owed)
                if self._owed > READER_OUTPUT_LIMIT:
                    await self.flush()
            else:
                await self.flush(wait=False)
            first = False
            if self._stop_reading_now:
                return

    def _protocol_error(self, exc: Exception) -> None:
        """The peer broke HTTP/2: GOAWAY (h2 may have queued it already) and give up."""
        logger.info("HTTP/2 protocol error from %s, sending GOAWAY: %s", self._peer, exc)
        h2 = self.h2
        if h2.state_machine.state is not ConnectionState.CLOSED:
            try:
                h2.close_connection(error_code=ErrorCodes.PROTOCOL_ERROR)
            except Exception:
                frame = GoAwayFrame(0)
                frame.last_stream_id = h2.highest_inbound_stream_id
                frame.error_code = ErrorCodes.PROTOCOL_ERROR
                self._extra += frame.serialize()
        for request in list(self.requests.values()):
            request.on_gone()
        self._stop_reading()

    def _too_large(self, request: Request, limit: int) -> None:
        """Answer 413 (unless the app already answered) and stop the upload."""
        logger.debug("request body on stream %d over %d bytes", request.stream_id, limit)
        try:
            if not request.headers_sent:
                simple_response(self, request.stream_id, 413, f"request body over {limit} bytes")
                self.h2.reset_stream(request.stream_id, ErrorCodes.NO_ERROR)
            else:
                self.h2.reset_stream(request.stream_id, ErrorCodes.CANCEL)
        except H2ProtocolError:
            pass
        request.on_gone()  # the app sees http.disconnect; what it sends now is dropped

    def _handle(self, events: list[Event]) -> None:
        requests = self.requests
        for event in events:
            if isinstance(event, DataReceived):
                sid = event.stream_id
                request = requests.get(sid)
                if request is not None and not request.gone:
                    request.on_data(event.data, event.flow_controlled_length)
                    limit = self._info.max_body_size
                    if limit is not None and request.received > limit:
                        self._too_large(request, limit)
                elif event.flow_controlled_length:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, RequestReceived):
                self._on_request(event)
            elif isinstance(event, StreamEnded):
                request = requests.get(event.stream_id)
                if request is not None:
                    request.on_end()
            elif isinstance(event, WindowUpdated):
                if event.stream_id == 0:
                    for request in list(self.blocked):
                        request.wake_writer()
                else:
                    request = requests.get(event.stream_id)
                    if request is not None:
                        request.wake_writer()
            elif isinstance(event, StreamReset):
                request = requests.get(event.stream_id)
                if request is not None:
                    request.on_gone()
            elif isinstance(event, RemoteSettingsChanged):
                for request in list(self.blocked):
                    request.wake_writer()  # the initial window may have grown
            elif isinstance(event, ConnectionTerminated):
                # h2 sends nothing after a GOAWAY in either direction, so the
                # requests still running can no longer be answered.
                self._mark_dead("the peer sent GOAWAY")
                return

    def _on_request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        assert sid is not None
        assert event.headers is not None
        h2 = self.h2
        if (self._goaway_last is not None and sid > self._goaway_last) or (
            self.open_streams >= self._max_streams
        ):
            h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        try:
            scope = self._scopes.build(event.headers)
            limit = self._info.max_body_size
            if limit is not None and _declared_length(event.headers) > limit:
                raise BadRequest(413, f"request body over {limit} bytes")
        except BadRequest as exc:
            logger.debug("bad request from %s on stream %d: %s", self._peer, sid, exc.reason)
            try:
                simple_response(self, sid, exc.status, exc.reason)
                if event.stream_ended is None:
                    h2.reset_stream(sid, ErrorCodes.NO_ERROR)  # we will not read the body
            except H2ProtocolError:
                pass  # later frames of the same read closed the stream: only it is lost
            return
        request = Request(self, sid, scope)
        self.requests[sid] = request
        self.open_streams += 1
        assert self._request_tasks is not None
        self._request_tasks.start(self._run_request, request)

    async def _run_request(self, request: Request) -> None:
        try:
            await self._app(request.scope, request.receive, request.send)
        except Exception as exc:
            request.app_failed(exc)
        else:
            request.app_returned()
        finally:
            request.finish()
            self.blocked.discard(request)
            del self.requests[request.stream_id]
            if self._idle_timeout is not None:
                self._last_active = anyio.current_time()  # idle from the last answer on
            if self._draining and not self.requests:
                self._stop_reading()
        await self.flush()

    # -- writing -----------------------------------------------------------------------------

    def _take(self) -> bytes:
        self._first_flush_due = False
        data = self.h2.data_to_send()
        if self._unsent:
            self._unsent += data
            data = bytes(self._unsent)
            self._unsent.clear()
        if self._extra:
            data, self._extra = data + self._extra, b""
        return data

    async def flush(self, wait: bool = True) -> None:
        """Write everything h2 has queued.

        If another task is writing, it will write our frames too; with `wait`
        we return only once it has (backpressure for response bodies). What the
        overlay stream can take at once is handed to it synchronously
        (`OverlayStream.try_send`): nothing can interrupt that, so it needs
        neither the shielded cancel scope nor the guard that a `send` does.
        """
        if self._writing:
            if wait:
                event = self._flushed
                if event is None:
                    event = self._flushed = anyio.Event()
                await event.wait()
            return
        data = self._take()
        if not data or self.dead:
            return
        if self._stream.try_send(data):
            return
        self._writing = True
        timed = self._idle_timeout is not None
        try:
            with anyio.CancelScope(shield=True):
                while data:
                    piece = TIMED_PIECE if timed else len(data)
                    for start in range(0, len(data), piece):  # all of it at once if untimed
                        if timed:
                            self._send_since = anyio.current_time()
                        await self._stream.send(data[start : start + piece])
                    data = self._take()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            self._mark_dead(f"sending failed: {exc}")
        finally:
            self._writing = False
            self._send_since = None
            self._owed = 0
            event = self._flushed
            if event is not None:
                self._flushed = None
                event.set()


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The request's content-length (0 when absent or unreadable: the data will tell)."""
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
