"""A handshake flood over real UDP: the established tunnel keeps serving, and once the
flood stops the node's tables shrink back (nothing the flood created stays)."""

from __future__ import annotations

import socket

import anyio
import anyio.lowlevel
import pytest
from _nodes import echo, node_pair

from overlay_httpx import Address, Identity
from overlay_httpx._protocol._endpoint import Endpoint

pytestmark = pytest.mark.anyio


def _initiations(target_public: object, count: int) -> list[bytes]:
    out = []
    for i in range(count):
        attacker = Endpoint(Identity.generate(), Address(1, 5000 + i), timestamp_origin_ns=1)
        attacker.connect(target_public, ("127.0.0.1", 9), 0.0)  # type: ignore[arg-type]
        [(init, _)] = attacker.datagrams_to_send(0.0)
        out.append(init)
    return out


async def test_a_handshake_flood_leaves_the_tunnel_serving_and_nothing_behind() -> None:
    async with node_pair(handshake_timeout=1.0) as (client, server):
        listener = await server.listen(80)
        flood = _initiations(server.public, 400)
        sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(40)]
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(listener.serve, echo)
                stream = await client.connect(server.address, 80)

                async def flood_for(seconds: float) -> None:
                    with anyio.move_on_after(seconds):
                        while True:
                            for i, init in enumerate(flood):  # new keys, then replays
                                sockets[i % len(sockets)].sendto(init, server.endpoint)
                                if i % 40 == 0:
                                    await anyio.lowlevel.checkpoint()

                group.start_soon(flood_for, 1.5)
                for i in range(50):  # the established tunnel serves throughout
                    message = f"request {i}".encode()
                    with anyio.fail_after(2):
                        await stream.send(message)
                        assert await stream.receive() == message
                    await anyio.sleep(0.02)
                drops = server.statistics().drops
                assert drops.get("cookie_required", 0) > 0  # the load kicked in
                # The flood ends 1.5 s after it began; what it created is due to be
                # reaped one handshake timeout (1 s) after it was made, plus a short
                # drain: the passing of that time is what this part tests.
                endpoint = server._endpoint
                assert endpoint is not None
                await anyio.sleep(1.5 + 1.0 + 1.0)  # until the flood ends, then the timeout + drain
                assert [t.peer_address for t in endpoint.tunnels()] == [client.address]
                assert len(endpoint._accepted_timestamps) == 1
                assert len(endpoint._indexes) <= 3
                await stream.aclose()
                group.cancel_scope.cancel()
        finally:
            for sock in sockets:
                sock.close()
