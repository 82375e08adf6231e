"""Two nodes in one process on 127.0.0.1: an echo server and a client, over real UDP.

Run:  .venv/bin/python examples/node_echo.py [asyncio|trio]
"""

from __future__ import annotations

import hashlib
import sys

import anyio

from overlay_httpx import Identity, Node, OverlayAttribute, OverlayStream


async def echo(stream: OverlayStream) -> None:
    """Send every byte back; half-close when the client does."""
    while True:
        try:
            data = await stream.receive()
        except anyio.EndOfStream:
            await stream.send_eof()
            return
        await stream.send(data)


async def main() -> None:
    async with Node(Identity.generate()) as server, Node(Identity.generate()) as client:
        client.add_peer(server.address, server.public, server.endpoint)
        listener = await server.listen(7)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            stream = await client.connect(server.address, 7)
            data = bytes(range(256)) * 4096  # 1 MiB
            received = bytearray()

            async def send() -> None:
                await stream.send(data)
                await stream.send_eof()

            async with anyio.create_task_group() as io:
                io.start_soon(send)
                while True:
                    try:
                        received += await stream.receive()
                    except anyio.EndOfStream:
                        break
            rtt = stream.extra(OverlayAttribute.rtt)
            same = hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
            print(f"{server.address} echoed {len(received)} bytes intact={same}")
            print(f"tunnel RTT {rtt * 1e6:.0f} µs" if rtt else "tunnel RTT unknown")
            await listener.aclose()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
