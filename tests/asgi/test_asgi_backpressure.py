"""A peer that stops reading is stopped in turn: the server reads no more while its
writer waits on that peer, so what the peer provokes cannot pile up without bound."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from _h2client import served
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
            assert len(connection.h2.data_to_send()) < 256 << 10  # no pile of PING ACKs
            tg.cancel_scope.cancel()
        stream.reset()
