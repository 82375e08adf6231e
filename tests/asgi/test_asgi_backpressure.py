"""A peer that stops reading is stopped in turn: while a writer waits on that peer, what
its frames make the server owe it is bounded, and past the bound the server reads no more.
A peer that reads only once its own writes go through is not stalled by that."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from _h2client import H2Client, served
from h2.config import H2Configuration
from h2.connection import H2Connection

pytestmark = pytest.mark.anyio

PING = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"  # one PING frame, 17 bytes
FLOOD = 32 << 20


async def test_a_client_that_floods_pings_and_never_reads_is_held_back() -> None:
    started = anyio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        started.set()
        await send({"type": "http.response.body", "body": b"x" * (16 << 20)})

    async with served(app, lifespan="off") as (server, client_node):
        stream = await client_node.connect(server.node.address, server.port)
        h2 = H2Connection(H2Configuration(client_side=True))
        h2.initiate_connection()
        h2.increment_flow_control_window(1 << 30)
        h2.send_headers(
            1, [(":method", "GET"), (":scheme", "http"), (":authority", "t"), (":path", "/")]
        )
        h2.increment_flow_control_window(1 << 30, stream_id=1)
        await stream.send(h2.data_to_send())
        with anyio.fail_after(5):
            await started.wait()  # the response's writer now waits for us, who never read
        sent = 0

        async def flood() -> None:
            nonlocal sent
            block = PING * (65536 // len(PING))
            while sent < FLOOD:
                await stream.send(block)
                sent += len(block)

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            await anyio.wait_all_tasks_blocked()  # the flood is stuck: the server stopped reading
            [connection] = server._connections
            assert sent < FLOOD
            owed = len(connection._unsent) + len(connection.h2.data_to_send())
            assert owed < 256 << 10  # no pile of PING ACKs
            tg.cancel_scope.cancel()
        stream.reset()


async def test_a_client_that_reads_only_between_its_writes_is_not_stalled() -> None:
    """The test client flushes under the lock its senders hold, after each read: a server
    that stopped reading whenever a response waited would deadlock with it here."""
    big_size = 16 << 20

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/big":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(big_size >> 20):
                chunk = b"x" * (1 << 20)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})

    async with served(app, lifespan="off") as (server, client_node):
        stream = await client_node.connect(server.node.address, server.port)
        client = H2Client(stream)
        sizes: list[bytes] = []

        async def upload() -> None:
            sizes.append((await client.request("POST", "/up", b"u" * (1 << 20))).body)

        async with anyio.create_task_group() as tg:
            tg.start_soon(client.read_loop)
            await client.start()
            big = client.open("GET", "/big")
            await client.flush()
            with anyio.fail_after(10):
                await big.wait_headers()
                async with anyio.create_task_group() as uploads:
                    for _ in range(4):
                        uploads.start_soon(upload)
                await big.wait_end()
            tg.cancel_scope.cancel()
        assert sizes == [b"1048576"] * 4
        assert len(big.body) == big_size
        stream.reset()
