"""The ASGI bridge's life: lifespan, graceful shutdown, limits, and peers that misbehave."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from _h2client import H2Client, h2_connect, node_pair, served
from fastapi import FastAPI, Request
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from overlay_httpx import PortUnreachable
from overlay_httpx._asgi import LifespanFailed, OverlayServer, serve

pytestmark = pytest.mark.anyio


async def _plain_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app with no lifespan support: it fails on anything but http."""
    assert scope["type"] == "http", "only http here"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"plain"})


async def test_lifespan_startup_and_shutdown_run_once_around_the_requests() -> None:
    calls: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        calls.append("startup")
        yield {"model": "loaded"}
        calls.append("shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.get("/state")
    async def state(request: Request) -> dict[str, str]:
        calls.append("request")
        return {"model": request.state.model}

    async with served(app) as (server, client_node):
        assert calls == ["startup"]  # started() came after startup completed
        async with h2_connect(client_node, server) as client:
            for _ in range(2):
                assert (await client.request("GET", "/state")).body == b'{"model":"loaded"}'
        async with h2_connect(client_node, server) as client:  # a second connection
            assert (await client.request("GET", "/state")).status == 200
    assert calls == ["startup", "request", "request", "request", "shutdown"]


@pytest.mark.parametrize("mode", ["auto", "off"])
async def test_an_app_without_lifespan_support_is_served(mode: str) -> None:
    async with (
        served(_plain_app, lifespan=mode) as (server, client_node),
        h2_connect(client_node, server) as client,
    ):
        response = await client.request("GET", "/")
    assert (response.status, response.body) == (200, b"plain")


async def test_lifespan_on_requires_support() -> None:
    async with node_pair() as (node, _):
        with pytest.raises(LifespanFailed, match="lifespan='on'"):
            await serve(_plain_app, node, lifespan="on")


async def test_a_failed_startup_is_a_clear_error() -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        raise RuntimeError("no GPU")
        yield

    async with node_pair() as (node, _), anyio.create_task_group() as tg:
        with pytest.raises(LifespanFailed, match="no GPU"):
            await tg.start(serve, FastAPI(lifespan=lifespan), node)
        # the port is free again
        await (await node.listen(80)).aclose()


async def test_malformed_bytes_get_goaway_and_other_connections_carry_on() -> None:
    async with (
        served(_plain_app) as (server, client_node),
        h2_connect(client_node, server) as good,
    ):
        assert (await good.request("GET", "/")).status == 200
        for garbage in (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not even the preface
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" * 2,
        ):
            async with h2_connect(client_node, server, preface=False) as bad:
                await bad.send_raw(garbage)
                await bad.wait_for(lambda bad=bad: bad.closed)
                assert bad.goaway is not None
                assert bad.goaway.error_code != ErrorCodes.NO_ERROR
            assert (await good.request("GET", "/")).status == 200
        assert good.goaway is None


async def test_a_header_block_far_over_the_limit_ends_that_connection() -> None:
    """Up to twice the advertised size is a 431 (see test_asgi_http); beyond, HPACK gives up."""
    async with served(_plain_app, max_header_list_size=4096) as (server, client_node):
        async with h2_connect(client_node, server) as bad:
            bad.open("GET", "/", [(b"x-huge", b"a" * 3 * 4096)])
            await bad.flush()
            await bad.wait_for(lambda: bad.closed)
            assert bad.goaway is not None
            assert bad.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        async with h2_connect(client_node, server) as good:
            assert (await good.request("GET", "/")).status == 200


async def test_the_concurrent_stream_limit_is_advertised_and_enforced() -> None:
    release = anyio.Event()
    inside = 0

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal inside
        assert scope["type"] == "http"
        inside += 1
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    async with (
        served(app, max_concurrent_streams=3) as (server, client_node),
        h2_connect(client_node, server, preface=False) as client,
    ):
        # Four requests in the first flight, before the server's SETTINGS can arrive.
        client.h2.initiate_connection()
        responses = [client.open("GET", f"/{i}") for i in range(4)]
        await client.flush()
        await responses[3].wait_end()
        assert responses[3].reset_code == ErrorCodes.REFUSED_STREAM
        assert client.server_settings[SettingCodes.MAX_CONCURRENT_STREAMS] == 3
        assert inside == 3
        release.set()
        for response in responses[:3]:
            await response.wait_end()
            assert (response.status, response.body) == (200, b"done")
        assert (await client.request("GET", "/again")).status == 200  # slots came back


async def _slow_app_parts() -> tuple[Any, anyio.Event, anyio.Event, list[str]]:
    entered, release = anyio.Event(), anyio.Event()
    log: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            log.append("lifespan shutdown")
            await send({"type": "lifespan.shutdown.complete"})
            return
        entered.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"finished"})
        log.append("response sent")

    return app, entered, release, log


async def test_graceful_shutdown_drains_an_in_flight_request() -> None:
    app, entered, release, log = await _slow_app_parts()
    async with node_pair() as (server_node, client_node), anyio.create_task_group() as tg:
        server = OverlayServer(app, server_node)
        await tg.start(server.serve)
        async with h2_connect(client_node, server) as client:
            in_flight = client.open("GET", "/slow")
            await client.flush()
            await entered.wait()
            tg.start_soon(server.shutdown)
            await client.wait_for(lambda: client.goaway is not None)
            assert client.goaway is not None
            assert client.goaway.last_stream_id == in_flight.stream_id
            assert client.goaway.error_code == ErrorCodes.NO_ERROR
            late = await client.request("GET", "/late")  # past the GOAWAY: refused
            assert late.reset_code == ErrorCodes.REFUSED_STREAM
            async with h2_connect(client_node, server) as other:  # no new connections
                assert (await other.request("GET", "/")).lost
            assert isinstance(other.error, PortUnreachable)
            release.set()
            await in_flight.wait_end()
            assert (in_flight.status, in_flight.body) == (200, b"finished")
            await client.wait_for(lambda: client.closed)
    assert log == ["response sent", "lifespan shutdown"]


async def test_cancelling_serve_is_graceful_too() -> None:
    app, entered, release, log = await _slow_app_parts()
    async with node_pair() as (server_node, client_node), anyio.create_task_group() as outer:
        serving = anyio.CancelScope()

        async def run_server(*, task_status: Any) -> None:
            with serving:
                await serve(app, server_node, task_status=task_status)

        await outer.start(run_server)
        stream = await client_node.connect(server_node.address, 80)
        client = H2Client(stream)
        outer.start_soon(client.read_loop)
        await client.start()
        in_flight = client.open("GET", "/slow")
        await client.flush()
        await entered.wait()
        serving.cancel()
        await client.wait_for(lambda: client.goaway is not None)
        release.set()
        await in_flight.wait_end()
        assert (in_flight.status, in_flight.body) == (200, b"finished")
        await client.wait_for(lambda: client.closed)
    assert log == ["response sent", "lifespan shutdown"]


async def test_shutdown_resets_what_is_left_after_the_timeout() -> None:
    cancelled = anyio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    async with node_pair() as (server_node, client_node), anyio.create_task_group() as tg:
        server = OverlayServer(app, server_node, lifespan="off", shutdown_timeout=0.1)
        await tg.start(server.serve)
        async with h2_connect(client_node, server) as client:
            stuck = client.open("GET", "/stuck")
            await client.flush()
            await client.ping()  # the request is in the app
            with anyio.fail_after(5):
                await server.shutdown()
            assert cancelled.is_set()
            await stuck.wait_end()
            assert stuck.reset_code == ErrorCodes.CANCEL


async def test_a_client_that_goes_away_is_a_disconnect() -> None:
    disconnected = anyio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected.set()

    async with served(app, lifespan="off") as (server, client_node):
        async with h2_connect(client_node, server) as client:
            client.open("GET", "/")
            await client.flush()
            await client.ping()
        with anyio.fail_after(1):  # the client closed its connection
            await disconnected.wait()
