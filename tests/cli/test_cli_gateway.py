"""The byte pipe and the TCP gateway, in process, on asyncio and trio.

Node A serves (an ASGI app, or raw overlay listeners); node B runs the
gateway; plain TCP clients talk to the gateway's port.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest
from anyio.abc import ByteStream, SocketAttribute
from fastapi import FastAPI, Request

from overlay_httpx import Address, Identity, Node, OverlayStream, serve
from overlay_httpx._cli._gateway import serve_gateway
from overlay_httpx._cli._pipe import pipe

pytestmark = pytest.mark.anyio


def _payload(size: int) -> bytes:
    block = hashlib.sha256(b"gateway").digest() * 2048
    return (block * (size // len(block) + 1))[:size]


@asynccontextmanager
async def _nodes() -> AsyncIterator[tuple[Node, Node]]:
    async with Node(Identity.generate()) as a, Node(Identity.generate()) as b:
        b.add_peer(a.address, a.public, a.endpoint)
        yield a, b


@asynccontextmanager
async def _gateway(node: Node, address: Address | str, port: int) -> AsyncIterator[int]:
    async with anyio.create_task_group() as group:
        _, bound = await group.start(
            functools.partial(serve_gateway, node, address, port, listen=("127.0.0.1", 0))
        )
        yield bound
        group.cancel_scope.cancel()


async def _receive_all(stream: ByteStream) -> bytes:
    parts = []
    while True:
        try:
            parts.append(await stream.receive())
        except anyio.EndOfStream:
            return b"".join(parts)


async def test_http2_client_reaches_a_fastapi_app_through_the_gateway() -> None:
    app = FastAPI()

    @app.get("/health")
    async def health(request: Request) -> dict[str, str]:
        return {
            "status": "ok",
            "caller": str(request.scope["extensions"]["overlay"]["peer_address"]),
        }

    @app.post("/sum")
    async def total(body: list[int]) -> dict[str, int]:
        return {"sum": sum(body)}

    with anyio.fail_after(10):
        async with _nodes() as (a, b), anyio.create_task_group() as group:
            await group.start(functools.partial(serve, app, a, port=80))
            async with _gateway(b, a.address, 80) as port:
                client = httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", http1=False, http2=True, trust_env=False
                )
                async with client:
                    r = await client.get("/health")
                    assert r.http_version == "HTTP/2"
                    assert r.json() == {"status": "ok", "caller": str(b.address)}
                    r = await client.post("/sum", json=list(range(100)))
                    assert r.json() == {"sum": 4950}
            group.cancel_scope.cancel()


async def _digest_then_reply(stream: OverlayStream) -> None:
    """Read to end of stream, *then* answer: only works if half-close crosses the gateway."""
    data = await _receive_all(stream)
    await stream.send(hashlib.sha256(data).hexdigest().encode() + b" " + str(len(data)).encode())
    await stream.send_eof()


async def _echo(stream: OverlayStream) -> None:
    while True:
        try:
            data = await stream.receive()
        except anyio.EndOfStream:
            await stream.send_eof()
            return
        await stream.send(data)


async def test_raw_tcp_echo_and_half_close_through_the_gateway() -> None:
    data = _payload(1 << 20)
    with anyio.fail_after(15):
        async with _nodes() as (a, b), anyio.create_task_group() as group:
            echo, digest = await a.listen(7), await a.listen(9)
            group.start_soon(echo.serve, _echo)
            group.start_soon(digest.serve, _digest_then_reply)
            async with (
                _gateway(b, a.address, 7) as echo_port,
                _gateway(b, a.address, 9) as digest_port,
            ):
                tcp = await anyio.connect_tcp("127.0.0.1", echo_port)
                async with tcp, anyio.create_task_group() as io:

                    async def upload() -> None:
                        await tcp.send(data)
                        await tcp.send_eof()

                    io.start_soon(upload)
                    assert await _receive_all(tcp) == data

                tcp = await anyio.connect_tcp("127.0.0.1", digest_port)
                async with tcp:
                    await tcp.send(data)
                    await tcp.send_eof()
                    answer = await _receive_all(tcp)
                assert answer == f"{hashlib.sha256(data).hexdigest()} {len(data)}".encode()
            echo.close()
            digest.close()
            group.cancel_scope.cancel()


async def test_a_refused_overlay_port_closes_the_tcp_connection() -> None:
    with anyio.fail_after(10):
        async with _nodes() as (a, b), _gateway(b, a.address, 81) as port:
            tcp = await anyio.connect_tcp("127.0.0.1", port)
            async with tcp:
                await tcp.send(b"hello")
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await tcp.receive()


async def test_an_unknown_peer_closes_the_tcp_connection() -> None:
    stranger = Address.parse("1:0001.0000.0042")
    with anyio.fail_after(10):
        async with _nodes() as (_, b), _gateway(b, stranger, 80) as port:
            tcp = await anyio.connect_tcp("127.0.0.1", port)
            async with tcp:
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await tcp.receive()


async def test_pipe_aborts_both_sides_when_one_fails() -> None:
    """The overlay peer resets its stream: the TCP side is torn down, the result says why."""
    with anyio.fail_after(10):
        async with _nodes() as (a, b), anyio.create_task_group() as group:
            listener = await a.listen(5)
            tcp_listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
            port = tcp_listener.extra(SocketAttribute.local_port)
            async with tcp_listener:
                client = await anyio.connect_tcp("127.0.0.1", port)
                async with client:
                    server_side = await tcp_listener.listeners[0].accept()
                    overlay = await b.connect(a.address, 5)
                    await overlay.send(b"x")
                    incoming = await listener.accept()
                    results = []
                    piped = anyio.Event()

                    async def run_pipe() -> None:
                        results.append(await pipe(server_side, overlay))
                        piped.set()

                    group.start_soon(run_pipe)
                    await client.send(b"ping")
                    received = b""
                    while len(received) < 5:
                        received += await incoming.receive()
                    assert received == b"xping"
                    incoming.reset()
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        await client.receive()
                    await piped.wait()
            [result] = results
            assert result.error is not None
            assert result.failed is overlay
            assert result.a_to_b == 4
            listener.close()


class _Names:
    """A resolver as the rendezvous would answer: names to addresses, best first."""

    def __init__(self, names: dict[str, list[Address]]) -> None:
        self.names = names

    async def resolve(self, host: str) -> list[Address]:
        return self.names.get(host, [])


async def test_gateway_to_a_name_tries_each_node_it_resolves_to() -> None:
    stranger = Address.parse("1:0001.0000.0042")  # unknown: skipped for the next node
    with anyio.fail_after(10):
        async with _nodes() as (a, b), anyio.create_task_group() as group:
            echo = await a.listen(7)
            group.start_soon(echo.serve, _echo)
            resolver = _Names({"gpu.tag.overlay": [stranger, a.address], "llm.overlay": []})
            gateway = functools.partial(
                serve_gateway, b, "gpu.tag.overlay", 7, listen=("127.0.0.1", 0), resolver=resolver
            )
            _, port = await group.start(gateway)
            tcp = await anyio.connect_tcp("127.0.0.1", port)
            async with tcp:
                await tcp.send(b"hello")
                await tcp.send_eof()
                assert await _receive_all(tcp) == b"hello"
            gateway = functools.partial(
                serve_gateway, b, "llm.overlay", 7, listen=("127.0.0.1", 0), resolver=resolver
            )
            _, port = await group.start(gateway)
            tcp = await anyio.connect_tcp("127.0.0.1", port)
            async with tcp:  # nobody registered under the name: closed at once
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await tcp.receive()
            echo.close()
            group.cancel_scope.cancel()
