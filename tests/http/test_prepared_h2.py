"""A new HTTP/2 connection takes h2 state made ahead of time, on both sides, and the
next one is made once the node is quiet."""

from __future__ import annotations

import anyio
import httpx
import pytest
from fastapi import FastAPI

from overlay_httpx import OverlayServer, OverlayTransport
from overlay_httpx._asgi import _connection
from overlay_httpx._http import _client

pytestmark = pytest.mark.anyio


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(body: dict[str, int]) -> dict[str, int]:
        return body

    return app


async def test_each_side_takes_the_prepared_h2_state_and_prepares_the_next(
    overlay_node_factory,  # type: ignore[no-untyped-def]
) -> None:
    server_node, client_node = await overlay_node_factory(), await overlay_node_factory()
    for node in (server_node, client_node):  # idle work waits: the test runs it
        node._idle._quiet = node._idle._longest = 3600.0
    server = OverlayServer(_app(), server_node, max_concurrent_streams=77)
    key = (77, 65536)
    _connection._spares.ready.pop(key, None)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        server_spare = _connection._spares.ready[key]  # made when the server started
        transport = OverlayTransport(client_node)
        client_spare = _client._spares.ready[()]  # made when the transport was
        async with httpx.AsyncClient(
            transport=transport, base_url=f"http://{server_node.address.host}"
        ) as client:
            r = await client.post("/echo", json={"n": 1})
            assert r.json() == {"n": 1}
            (conn,) = transport._connections.values()
            assert conn._h2 is client_spare
            (served,) = server._connections
            assert served.h2 is server_spare
            # The next ones are made once each node has been quiet for a moment.
            assert "HTTP/2 client state" in client_node._idle._work
            assert ("HTTP/2 server state", key) in server_node._idle._work
            assert not _client._spares.ready
            assert key not in _connection._spares.ready
            for node in (server_node, client_node):  # what the quiet moment would run
                for work in node._idle._work.values():
                    work()
            assert len(_client._spares.ready) == 1
            assert key in _connection._spares.ready
            # The prepared states work like fresh ones: a second request, same connection.
            assert (await client.post("/echo", json={"n": 2})).json() == {"n": 2}
            assert transport._connections[conn.peer, 80] is conn
        tg.cancel_scope.cancel()


def test_a_prepared_state_serves_one_connection() -> None:
    _client._spares.ready.clear()
    _client.prepare_connection()
    _client.prepare_connection()  # one is enough: no second spare
    assert len(_client._spares.ready) == 1
    first = _client._spares.take()
    second = _client._spares.take()  # none left: made on the spot
    assert first is not second
    assert not _client._spares.ready
    # Both have their preface and SETTINGS queued, to leave with the first request.
    assert first.data_to_send().startswith(b"PRI * HTTP/2.0")
    assert second.data_to_send().startswith(b"PRI * HTTP/2.0")
