"""`ReverseProxy` (what ``expose`` serves), in process, on asyncio and trio.

An h11 server on 127.0.0.1 is the HTTP/1.1 upstream; the proxy is served on
node A's overlay port; node B's `OverlayTransport` (HTTP/2) sends requests.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest
from _cli_helpers import http11_upstream
from anyio.abc import SocketAttribute

from overlay_httpx import Identity, Node, OverlayTransport, serve
from overlay_httpx._cli._expose import upstream_url
from overlay_httpx._cli._proxy import ReverseProxy

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def _exposed(upstream: str) -> AsyncIterator[tuple[httpx.AsyncClient, Node]]:
    proxy = ReverseProxy(upstream)
    async with (
        Node(Identity.generate()) as a,
        Node(Identity.generate()) as b,
        anyio.create_task_group() as group,
    ):
        b.add_peer(a.address, a.public, a.endpoint)
        await group.start(functools.partial(serve, proxy, a, port=8000))
        base = f"http://{a.address.host}:8000"
        async with httpx.AsyncClient(transport=OverlayTransport(b), base_url=base) as client:
            yield client, b
        group.cancel_scope.cancel()
    await proxy.aclose()


async def test_requests_reach_the_upstream_with_headers_and_query() -> None:
    with anyio.fail_after(10):
        async with http11_upstream() as up, _exposed(f"http://127.0.0.1:{up.port}") as (client, b):
            r = await client.get(
                "/v1/items/a%20b?x=1&y=%20",
                headers={"X-Custom": "yes", "X-Overlay-Peer-Address": "forged", "TE": "trailers"},
            )
            assert r.status_code == 201
            assert r.headers["x-upstream"] == "tiny"
            seen = r.json()
            assert seen["method"] == "GET"
            assert seen["target"] == "/v1/items/a%20b?x=1&y=%20"
            headers = dict(seen["headers"])
            assert headers["x-custom"] == "yes"
            assert headers["host"] == f"127.0.0.1:{up.port}"
            assert headers["x-forwarded-host"].endswith(".overlay:8000")
            assert headers["x-overlay-peer-address"] == str(b.address)  # proven, not forged
            assert headers["x-overlay-peer-identity"] == str(b.public)
            assert "te" not in headers
            # keep-alive: a second request, then a POST with a body
            body = b"z" * 300_000
            r = await client.post("/upload", content=body)
            assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
            assert r.json()["size"] == len(body)
            assert [req["method"] for req in up.requests] == ["GET", "POST"]


async def test_bodies_stream_both_ways() -> None:
    """Each direction's second chunk is only produced after the far end saw the first."""
    with anyio.fail_after(10):
        async with http11_upstream() as up, _exposed(f"http://127.0.0.1:{up.port}") as (client, _):
            first = b"1" * 300_000  # beyond what OverlayTransport batches before writing

            async def upload() -> AsyncIterator[bytes]:
                yield first
                await up.first_chunk_seen.wait()  # the upstream has it: nothing buffered it all
                yield b"part two"

            r = await client.post("/upload", content=upload())
            assert r.json()["sha256"] == hashlib.sha256(first + b"part two").hexdigest()

            async with client.stream("GET", "/stream-down") as response:
                chunks = response.aiter_raw()
                assert await chunks.__anext__() == b"first;"
                up.release.set()
                rest = b"".join([chunk async for chunk in chunks])
            assert rest == b"second"


async def test_a_down_upstream_gives_502() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now
    with anyio.fail_after(10):
        async with _exposed(f"http://127.0.0.1:{port}") as (client, _):
            r = await client.get("/health")
            assert r.status_code == 502
            assert r.headers["content-type"].startswith("text/plain")
            assert r.text.startswith(f"upstream http://127.0.0.1:{port} unreachable")
            assert r.text.count("\n") == 1


async def test_lifespan_is_answered() -> None:
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return messages.pop(0)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    proxy = ReverseProxy("http://127.0.0.1:1")
    await proxy({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://localhost:9000/", "http://localhost:9000"),
        ("[::1]:8000", "http://[::1]:8000"),
    ],
)
def test_upstream_url(text: str, expected: str) -> None:
    assert upstream_url(text) == expected


def test_upstream_url_rejects_paths() -> None:
    from overlay_httpx._cli._errors import UsageError

    with pytest.raises(UsageError, match="expected HOST:PORT"):
        upstream_url("127.0.0.1:8000/api")
    with pytest.raises(UsageError, match="expected HOST:PORT"):
        upstream_url("127.0.0.1")
