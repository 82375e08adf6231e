"""Half-open connections and requests are reaped once their peer falls silent.

The server's `idle_timeout` is set small here; everything else is awaited: a
silent stream's end-of-stream, a response's reset, a PING round trip.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from _h2client import h2_connect, served
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from starlette.requests import ClientDisconnect

from overlay_httpx import OverlayStream, OverlayTransport
from overlay_httpx._asgi import OverlayServer
from overlay_httpx._exceptions import LocalProtocolError

pytestmark = pytest.mark.anyio

IDLE = 0.3
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
GOAWAY_NO_ERROR = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00"  # the frame header; then the ids


async def _read_to_end(stream: OverlayStream) -> bytes:
    """Everything the server writes before it ends the stream (which it must, and soon)."""
    data = b""
    with anyio.fail_after(IDLE * 20):
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                return data


def _echo_app() -> FastAPI:
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    return app


async def test_silent_connections_are_closed_while_an_active_one_is_served() -> None:
    async with (
        served(_echo_app(), idle_timeout=IDLE) as (server, client_node),
        h2_connect(client_node, server) as active,
    ):
        silent = [await client_node.connect(server.node.address, 80) for _ in range(40)]
        for i, stream in enumerate(silent):
            # Half stop inside the preface, half after it and their SETTINGS.
            await stream.send(PREFACE[:5] if i % 2 else PREFACE + EMPTY_SETTINGS)
        served_meanwhile = 0
        async with anyio.create_task_group() as tg:
            endings: list[bytes] = []

            async def wait_end(stream: OverlayStream) -> None:
                endings.append(await _read_to_end(stream))

            for stream in silent:
                tg.start_soon(wait_end, stream)
            while len(endings) < len(silent):  # the active connection keeps asking
                response = await active.request("GET", "/")
                assert response.status == 200
                served_meanwhile += 1
        # Each silent stream got the server's SETTINGS and a graceful GOAWAY, then its end.
        assert all(data.endswith(b"\x00" * 8) and GOAWAY_NO_ERROR in data for data in endings)
        assert served_meanwhile > 0
        assert server.connections == 1  # only the active one is left
        response = await active.request("GET", "/")
        assert response.status == 200
        assert active.goaway is None
        for stream in silent:
            await stream.aclose()


async def test_a_request_whose_body_stops_coming_is_reset_and_its_app_told() -> None:
    app = FastAPI()
    outcome: list[str] = []

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
        except ClientDisconnect:
            outcome.append(f"disconnected after {size} bytes")
            raise
        return {"size": size}

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    async with (
        served(app, idle_timeout=IDLE) as (server, client_node),
        h2_connect(client_node, server) as client,
    ):
        stalled = client.open("POST", "/upload", end_stream=False)
        await client.send_body(stalled.stream_id, b"x" * 10, end_stream=False)
        with anyio.fail_after(IDLE * 20):
            await stalled.wait_end()
        assert stalled.reset_code == ErrorCodes.CANCEL
        assert stalled.status is None
        await client.ping()  # the app has run its except clause by now
        assert outcome == ["disconnected after 10 bytes"]
        response = await client.request("GET", "/")  # the connection carries on
        assert response.status == 200
        assert client.goaway is None


async def test_a_long_request_on_a_silent_connection_is_not_reaped() -> None:
    app = FastAPI()

    @app.post("/slow")
    async def slow(request: Request) -> dict[str, int]:
        await anyio.sleep(IDLE * 3)  # stands for a model computing while the client waits
        return {"size": len(await request.body())}

    async with (
        served(app, idle_timeout=IDLE) as (server, client_node),
        h2_connect(client_node, server) as client,
    ):
        complete = await client.request("POST", "/slow", b"y" * 100)
        assert complete.status == 200
        assert complete.body == b'{"size":100}'
        # The app has not read a body that is all there: the client is not to blame.
        partial = client.open("POST", "/slow", end_stream=False)
        await client.send_body(partial.stream_id, b"z" * 50, end_stream=False)
        stamp = anyio.current_time()
        with anyio.fail_after(IDLE * 20):
            await partial.wait_end()  # the app's read then starved: reset, not before
        assert partial.reset_code == ErrorCodes.CANCEL
        assert anyio.current_time() - stamp >= IDLE * 3
        assert client.goaway is None


async def test_httpx_reconnects_without_a_retry_after_its_idle_connection_closed() -> None:
    async with served(_echo_app(), idle_timeout=IDLE) as (server, client_node):
        transport = OverlayTransport(client_node)
        async with httpx.AsyncClient(transport=transport) as client:
            url = f"http://{server.node.address.host}/"
            first = await client.get(url)
            assert first.status_code == 200
            # A later, silent stream is reaped after the client's idle connection was.
            marker = await client_node.connect(server.node.address, 80)
            await marker.send(PREFACE[:5])  # a stream the server only learns of from data
            await _read_to_end(marker)
            await marker.aclose()
            assert server.connections == 0
            second = await client.get(url)
            assert second.status_code == 200
            assert second.extensions["overlay"]["attempts"] == 1  # it knew, no failed try


@pytest.mark.parametrize("value", [0, -1.0, float("nan")])
async def test_idle_timeout_must_be_positive(value: Any) -> None:
    async with served(_echo_app()) as (server, _client_node):
        with pytest.raises(LocalProtocolError, match="idle_timeout="):
            OverlayServer(_echo_app(), server.node, port=81, idle_timeout=value)


async def test_the_client_replaces_a_connection_idle_past_its_keepalive_expiry() -> None:
    async with served(_echo_app(), idle_timeout=IDLE) as (server, client_node):
        transport = OverlayTransport(client_node, keepalive_expiry=IDLE / 3)
        async with httpx.AsyncClient(transport=transport) as client:
            url = f"http://{server.node.address.host}/"
            assert (await client.get(url)).status_code == 200
            [first] = transport._connections.values()
            assert (await client.get(url)).status_code == 200  # at once: reused
            assert list(transport._connections.values()) == [first]
            await anyio.sleep(IDLE / 2)  # the passing of time is what is tested
            assert (await client.get(url)).status_code == 200  # a fresh connection
            [second] = transport._connections.values()
            assert second is not first
            assert first.overlay_stream.broken or first._closed  # the old one was closed


async def test_keepalive_expiry_must_not_be_negative() -> None:
    with pytest.raises(LocalProtocolError, match="keepalive_expiry="):
        OverlayTransport(keepalive_expiry=-1.0)


def _streaming_app(
    outcome: list[str], total: int | None = None, closed: anyio.Event | None = None
) -> FastAPI:
    """GET /stream: 16 KiB chunks, `total` bytes or without end; `outcome` says how it
    ended, and `closed` is set then."""
    app = FastAPI()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            sent = 0
            try:
                while total is None or sent < total:
                    await anyio.lowlevel.checkpoint()  # stands for a model's next token
                    sent += 16384
                    yield b"s" * 16384
            finally:
                outcome.append(f"closed after {sent} bytes")
                if closed is not None:
                    closed.set()

        return StreamingResponse(chunks())

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    return app


async def test_a_response_the_client_stops_reading_is_reset_while_it_keeps_talking() -> None:
    outcome: list[str] = []
    async with (
        served(_streaming_app(outcome), idle_timeout=IDLE) as (server, client_node),
        h2_connect(client_node, server, window=64 * 1024) as client,
    ):
        stuck = client.open("GET", "/stream")
        stuck.held = True  # read, never acknowledged: the server runs out of window
        await client.flush()
        stamp = anyio.current_time()
        served_meanwhile = 0
        with anyio.fail_after(IDLE * 20):
            while stuck.reset_code is None:  # other requests all along: not a silent peer
                assert (await client.request("GET", "/")).status == 200
                served_meanwhile += 1
        assert stuck.reset_code == ErrorCodes.CANCEL
        assert anyio.current_time() - stamp >= IDLE
        assert served_meanwhile > 1
        assert len(stuck.body) == 64 * 1024  # the window's worth, then nothing
        await client.ping()
        assert outcome[0].startswith("closed after")
        assert (await client.request("GET", "/")).status == 200  # the connection carries on
        assert client.goaway is None
        assert server.connections == 1


async def test_a_slow_reader_that_keeps_reading_gets_the_whole_response() -> None:
    outcome: list[str] = []
    window = 64 * 1024
    async with (
        served(_streaming_app(outcome, total=4 * window), idle_timeout=IDLE) as (
            server,
            client_node,
        ),
        h2_connect(client_node, server, window=window) as client,
    ):
        slow = client.open("GET", "/stream")
        slow.held = True
        await client.flush()
        with anyio.fail_after(IDLE * 40):
            while not slow.ended and slow.reset_code is None:
                # Each window's worth waits over half the timeout before the next.
                await anyio.sleep(IDLE * 0.6)  # the passing of time is what is tested
                await client.release(slow)
        assert slow.reset_code is None
        assert slow.body == b"s" * (4 * window)
        assert outcome == [f"closed after {4 * window} bytes"]


async def test_a_connection_whose_peer_leaves_our_writes_unread_is_closed() -> None:
    outcome: list[str] = []
    closed = anyio.Event()
    app = _streaming_app(outcome, closed=closed)

    async with served(app, idle_timeout=IDLE) as (server, client_node):
        stream = await client_node.connect(server.node.address, server.port)
        # Flow-control windows far beyond what the tunnel buffers, then no reading at
        # all: the server's writes themselves stall, not for want of HTTP/2 window.
        h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        h2.initiate_connection()
        h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        h2.increment_flow_control_window(2**31 - 1 - 65535)
        h2.send_headers(
            1,
            [
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"t"),
                (b":path", b"/stream"),
            ],
            end_stream=True,
        )
        await stream.send(h2.data_to_send())

        stamp = anyio.current_time()
        with anyio.fail_after(IDLE * 20):
            await closed.wait()  # the app's generator was stopped, with nothing read
        assert anyio.current_time() - stamp >= IDLE
        assert outcome[0].startswith("closed after")
        with pytest.raises(anyio.BrokenResourceError):
            await _read_to_end(stream)  # what the tunnel delivered, then the reset
        await stream.aclose()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_generator_that_awaits_nothing_does_not_spin_after_a_reset() -> None:
    """Starlette stops a streaming response from its disconnect listener, by a
    cancellation that must land somewhere: in `send`, when the generator has no
    await of its own (it is then left to the garbage collector)."""
    app = FastAPI()

    @app.get("/ready")
    async def ready() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            while True:
                yield b"r" * 16384

        return StreamingResponse(chunks())

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    async with (
        served(app) as (server, client_node),
        h2_connect(client_node, server) as client,
    ):
        await client.cancel_after_first_chunk("/ready")
        with anyio.fail_after(5):
            assert (await client.request("GET", "/")).status == 200  # the loop is free
        await client.ping()
        assert server.connections == 1


async def test_a_request_held_up_by_others_unread_bodies_is_not_reaped() -> None:
    """Eight bodies the apps do not read yet fill the connection's 8 MiB window, so
    the client cannot send a ninth request's body: that app waits, but not for
    the client's fault, and must not be reset as a half-open request."""
    app = FastAPI()
    go = anyio.Event()

    @app.post("/later")
    async def later(request: Request) -> dict[str, int]:
        await go.wait()  # stands for a queue in front of the model
        return {"size": len(await request.body())}

    @app.post("/now")
    async def now(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    mib = 1024 * 1024
    async with (
        served(app, idle_timeout=IDLE) as (server, client_node),
        h2_connect(client_node, server) as client,
    ):
        held = []
        for _ in range(8):  # each the server's whole 1 MiB stream window
            response = client.open("POST", "/later", end_stream=False)
            await client.send_body(response.stream_id, b"l" * mib)
            held.append(response)
        assert client.h2.outbound_flow_control_window == 0
        waiting = client.open("POST", "/now", end_stream=False)
        await client.flush()
        stamp = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.send_body, waiting.stream_id, b"n" * 1000)
            await anyio.sleep(IDLE * 3)  # the passing of time is what is tested
            assert waiting.reset_code is None
            assert not waiting.ended
            go.set()
        with anyio.fail_after(IDLE * 20):
            await waiting.wait_end()
            for response in held:
                await response.wait_end()
        assert anyio.current_time() - stamp >= IDLE * 3
        assert waiting.reset_code is None
        assert waiting.body == b'{"size":1000}'
        assert all(r.body == b'{"size":1048576}' for r in held)
