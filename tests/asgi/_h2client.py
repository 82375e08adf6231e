"""A small raw HTTP/2 client over one overlay stream, for driving the ASGI bridge in tests.

It speaks h2 directly (the httpx transport is tested on its own), so tests can
do what a well-behaved client would not: send garbage, break the stream limit,
reset streams mid-response, watch SETTINGS and GOAWAY frames.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.settings import SettingCodes

from overlay_httpx import Identity, Node, OverlayStream
from overlay_httpx._asgi import OverlayServer

WINDOW = 16 * 1024 * 1024


@asynccontextmanager
async def node_pair() -> AsyncIterator[tuple[Node, Node]]:
    async with Node(Identity.generate()) as server, Node(Identity.generate()) as client:
        server.add_peer(client.address, client.public, client.endpoint)
        client.add_peer(server.address, server.public, server.endpoint)
        yield server, client


@asynccontextmanager
async def served(app: Any, **options: Any) -> AsyncIterator[tuple[OverlayServer, Node]]:
    """`app` served on a fresh node; yields the server and a client node that knows it."""
    async with node_pair() as (server_node, client_node), anyio.create_task_group() as tg:
        server = OverlayServer(app, server_node, **options)
        await tg.start(server.serve)
        yield server, client_node
        await server.shutdown()


@dataclass
class Response:
    stream_id: int
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    ended: bool = False
    reset_code: int | None = None
    lost: bool = False  # the connection ended before the response did
    held: bool = False  # its data is not acknowledged until `H2Client.release`
    unacked: int = 0  # flow-controlled bytes held back
    changed: anyio.Event = field(default_factory=anyio.Event)

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def _notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def wait_headers(self) -> None:
        while self.status is None and not self._over:
            await self.changed.wait()

    async def next_chunk(self) -> bytes | None:
        """The next piece of body, or None once the stream ended or was reset."""
        while not self.chunks:
            if self._over:
                return None
            await self.changed.wait()
        return self.chunks.pop(0)

    @property
    def _over(self) -> bool:
        return self.ended or self.reset_code is not None or self.lost

    async def wait_end(self) -> None:
        while not self._over:
            await self.changed.wait()


class H2Client:
    """One HTTP/2 connection over an overlay stream; a reader task dispatches events."""

    def __init__(self, stream: OverlayStream, *, validate: bool = True) -> None:
        self.stream = stream
        self.h2 = H2Connection(
            H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=validate,
                normalize_outbound_headers=validate,
                validate_inbound_headers=False,
            )
        )
        self.responses: dict[int, Response] = {}
        self.server_settings: dict[int, int] = {}
        self.goaway: ConnectionTerminated | None = None
        self.ping_acks: list[bytes] = []
        self.closed = False  # the server ended the overlay stream
        self.error: BaseException | None = None  # how the stream ended, if it broke
        self.changed = anyio.Event()
        self._lock = anyio.Lock()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def start(self, *, preface: bool = True, window: int = WINDOW) -> None:
        if preface:
            self.h2.initiate_connection()
            self.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
            self.h2.increment_flow_control_window(WINDOW - 65535)
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            data = self.h2.data_to_send()
            if data:
                await self.stream.send(data)

    async def send_raw(self, data: bytes) -> None:
        async with self._lock:
            await self.stream.send(data)

    async def read_loop(self) -> None:
        try:
            while True:
                try:
                    data = await self.stream.receive(1 << 20)
                except anyio.EndOfStream:
                    return
                except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                    self.error = exc
                    return
                self._dispatch(self.h2.receive_data(data))
                await self.flush()
        finally:
            self.closed = True
            for response in self.responses.values():
                response.lost = not response.ended and response.reset_code is None
                response._notify()
            self._notify()

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, ResponseReceived):
                response = self.responses[event.stream_id]
                response.headers = [(bytes(n), bytes(v)) for n, v in event.headers]
                response.status = int(dict(response.headers)[b":status"])
                response._notify()
            elif isinstance(event, DataReceived):
                response = self.responses[event.stream_id]
                response.chunks.append(event.data)
                if response.held:
                    response.unacked += event.flow_controlled_length
                else:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                response._notify()
            elif isinstance(event, StreamEnded):
                response = self.responses[event.stream_id]
                response.ended = True
                response._notify()
            elif isinstance(event, StreamReset):
                response = self.responses[event.stream_id]
                response.reset_code = event.error_code
                response._notify()
            elif isinstance(event, RemoteSettingsChanged):
                for code, change in event.changed_settings.items():
                    self.server_settings[int(code)] = change.new_value
            elif isinstance(event, ConnectionTerminated):
                self.goaway = event
                if event.error_code == ErrorCodes.NO_ERROR:
                    # h2 stops all traffic after any GOAWAY; a graceful one still
                    # owes us the responses to the streams it names.
                    self.h2.state_machine.state = ConnectionState.CLIENT_OPEN
            elif isinstance(event, PingAckReceived):
                self.ping_acks.append(event.ping_data)
            if isinstance(
                event, (WindowUpdated, RemoteSettingsChanged, ConnectionTerminated, PingAckReceived)
            ):
                self._notify()

    async def wait_for(self, condition: Any) -> None:
        while not condition():
            await self.changed.wait()

    def open(
        self,
        method: str,
        path: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
        *,
        end_stream: bool = True,
    ) -> Response:
        """Queue a request's headers (call `flush` to send them)."""
        sid = self.h2.get_next_available_stream_id()
        response = self.responses[sid] = Response(sid)
        block = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", b"test.overlay"),
            (b":path", path.encode()),
            *headers,
        ]
        self.h2.send_headers(sid, block, end_stream=end_stream)
        return response

    async def send_body(self, stream_id: int, data: bytes, *, end_stream: bool = True) -> None:
        """Send a request body, waiting for the server's flow-control window as needed."""
        view = memoryview(data)
        while view:
            window = self.h2.local_flow_control_window(stream_id)
            if window <= 0:
                changed = self.changed
                await self.flush()
                await changed.wait()
                continue
            size = min(window, len(view), self.h2.max_outbound_frame_size)
            last = size == len(view)
            self.h2.send_data(stream_id, view[:size], end_stream=end_stream and last)
            view = view[size:]
            if view and len(self.h2._data_to_send) > 1 << 20:
                await self.flush()
        if end_stream and not data:
            self.h2.end_stream(stream_id)
        await self.flush()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> Response:
        response = self.open(method, path, headers, end_stream=not body)
        if body:
            await self.send_body(response.stream_id, body)
        else:
            await self.flush()
        await response.wait_end()
        return response

    async def ping(self, opaque: bytes = b"roundtrp") -> None:
        """A PING round trip: everything sent before it has been processed by the server."""
        self.h2.ping(opaque)
        await self.flush()
        await self.wait_for(lambda: opaque in self.ping_acks or self.closed)
        self.ping_acks.remove(opaque)

    async def release(self, response: Response) -> None:
        """Give the server back the window of `response`'s data held so far."""
        if response.unacked and response.reset_code is None and not response.ended:
            self.h2.acknowledge_received_data(response.unacked, response.stream_id)
        response.unacked = 0
        await self.flush()

    async def reset(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        self.h2.reset_stream(stream_id, code)
        await self.flush()

    async def cancel_after_first_chunk(self, path: str) -> None:
        """GET `path`, wait until its body has begun, then reset the stream (CANCEL)."""
        response = self.open("GET", path)
        await self.flush()
        assert await response.next_chunk()
        await self.reset(response.stream_id)


@asynccontextmanager
async def h2_connect(
    client_node: Node,
    server: OverlayServer,
    *,
    preface: bool = True,
    validate: bool = True,
    window: int = WINDOW,
) -> AsyncIterator[H2Client]:
    stream = await client_node.connect(server.node.address, server.port)
    client = H2Client(stream, validate=validate)
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.read_loop)
        await client.start(preface=preface, window=window)
        yield client
        tg.cancel_scope.cancel()
    await stream.aclose()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
