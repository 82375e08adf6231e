"""httpx through OverlayTransport to FastAPI apps served on the overlay (both backends)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import socket
from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio
import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from overlay_httpx import Address, Identity, Node, OverlayTransport, serve

pytestmark = pytest.mark.anyio

BIG = 10 << 20


def _payload(size: int) -> bytes:
    block = hashlib.sha256(b"overlay").digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def make_app(events: dict[str, anyio.Event] | None = None) -> FastAPI:
    events = events if events is not None else {}
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: dict[str, object]) -> dict[str, object]:
        return {"echo": body, "tokens": 3}

    @app.get("/whoami")
    async def whoami(request: Request) -> dict[str, str]:
        overlay = request.scope["extensions"]["overlay"]
        return {
            "address": str(overlay["peer_address"]),
            "identity": str(overlay["peer_identity"]),
        }

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, object]:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
        return {"sha256": digest.hexdigest(), "size": size}

    @app.get("/download")
    async def download() -> Response:
        return Response(_payload(BIG), media_type="application/octet-stream")

    @app.get("/tokens")
    async def tokens() -> StreamingResponse:
        release = events.setdefault("release", anyio.Event())
        stopped = events.setdefault("stopped", anyio.Event())

        async def generate():  # type: ignore[no-untyped-def]
            try:
                yield b"data: first\n\n"
                await release.wait()  # the client reads the first chunk before this ends
                for i in range(1000):
                    yield f"data: token {i}\n\n".encode()
                    await anyio.sleep(0.01)
            finally:
                stopped.set()

        return StreamingResponse(generate(), media_type="text/event-stream")

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await anyio.sleep(1)  # past the read timeout; short, since shutdown drains it
        return {"slow": True}

    @app.post("/never-reads")
    async def never_reads() -> dict[str, bool]:
        await anyio.sleep(1)
        return {"read": False}

    return app


async def test_json_post_and_response_extensions(overlay_app_client) -> None:  # type: ignore[no-untyped-def]
    client = await overlay_app_client(make_app())
    r = await client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 200
    assert r.json() == {"echo": {"prompt": "hi"}, "tokens": 3}
    assert r.http_version == "HTTP/2"
    overlay = r.extensions["overlay"]
    assert isinstance(overlay["peer_address"], Address)
    assert overlay["path"] == "direct"
    assert overlay["fingerprint"] == overlay["peer_identity"].fingerprint
    assert overlay["attempts"] == 1


async def test_caller_identity_is_visible_to_the_app(
    overlay_node_factory,  # type: ignore[no-untyped-def]
) -> None:
    server, client_node = await overlay_node_factory(), await overlay_node_factory()
    async with anyio.create_task_group() as tg:
        await tg.start(functools.partial(serve, make_app(), server))
        async with httpx.AsyncClient(transport=OverlayTransport(client_node)) as client:
            r = await client.get(f"http://{server.address.host}/whoami")
        assert r.json() == {
            "address": str(client_node.address),
            "identity": str(client_node.public),
        }
        tg.cancel_scope.cancel()


async def test_10_mib_upload_and_download_intact(overlay_app_client) -> None:  # type: ignore[no-untyped-def]
    client = await overlay_app_client(make_app())
    data = _payload(BIG)

    async def body():  # type: ignore[no-untyped-def]
        for i in range(0, len(data), 1 << 20):
            yield data[i : i + (1 << 20)]

    r = await client.post("/upload", content=body())
    assert r.json() == {"sha256": hashlib.sha256(data).hexdigest(), "size": BIG}
    r = await client.get("/download")
    assert hashlib.sha256(r.content).hexdigest() == hashlib.sha256(data).hexdigest()


# Stopping early inside httpx's own `Response.aiter_raw` leaves httpx's inner async
# generator (BoundAsyncStream.__aiter__) for the garbage collector, which trio
# reports; our body iterator is a class and leaves nothing behind.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*BoundAsyncStream:pytest.PytestUnraisableExceptionWarning"
)
async def test_sse_first_chunk_arrives_before_the_generator_ends_and_cancel_stops_it(
    overlay_app_client,  # type: ignore[no-untyped-def]
) -> None:
    events: dict[str, anyio.Event] = {"release": anyio.Event(), "stopped": anyio.Event()}
    client = await overlay_app_client(make_app(events))
    async with client.stream("GET", "/tokens") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        async with aclosing(r.aiter_raw()) as chunks:
            first = await chunks.__anext__()
            assert first.startswith(b"data: first")
            assert not events["stopped"].is_set()  # the generator is still running
            events["release"].set()
            await chunks.__anext__()
    # Leaving the block closed the response mid-stream: RST_STREAM stops the generator.
    with anyio.fail_after(1):
        await events["stopped"].wait()


async def test_500_concurrent_requests_share_one_tunnel(
    overlay_app_client,  # type: ignore[no-untyped-def]
) -> None:
    client = await overlay_app_client(make_app())
    results: list[int] = []

    async def one(i: int) -> None:
        r = await client.post("/v1/completions", json={"i": i})
        assert r.json()["echo"] == {"i": i}
        results.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(500):
            tg.start_soon(one, i)
    assert sorted(results) == list(range(500))
    transport = client._transport
    assert isinstance(transport, OverlayTransport)
    (tunnel,) = transport.node.statistics().tunnels
    assert tunnel.handshakes == 1


async def test_read_timeout(overlay_app_client) -> None:  # type: ignore[no-untyped-def]
    client = await overlay_app_client(make_app())
    with pytest.raises(httpx.ReadTimeout):
        await client.get("/slow", timeout=httpx.Timeout(5, read=0.2))
    r = await client.post("/v1/completions", json={})  # the connection is still fine
    assert r.status_code == 200


async def test_write_timeout(overlay_app_client) -> None:  # type: ignore[no-untyped-def]
    client = await overlay_app_client(make_app())
    data = _payload(64 << 20)  # far beyond the HTTP/2 and tunnel windows
    with pytest.raises(httpx.WriteTimeout):
        await client.post("/never-reads", content=data, timeout=httpx.Timeout(5, write=0.3))


@pytest.mark.parametrize(
    "body",
    [None, b"small: made during the handshake", b"x" * (1 << 20)],
    ids=["no body", "small body", "1 MiB body"],
)
@pytest.mark.parametrize("handshake_timeout", [10, 0.3], ids=["connect timeout", "handshake"])
async def test_connect_timeout_on_a_dead_peer(body: bytes | None, handshake_timeout: float) -> None:
    """Whether the request was made during the handshake (small or no body) or waits
    for it (a body that could wait for flow control), a peer that never answers is
    a ConnectTimeout: our connect timeout, or the tunnel's handshake timeout."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        async with Node(Identity.generate(), handshake_timeout=handshake_timeout) as node:
            ghost = Address.parse("1:0001.0000.0099")
            node.add_peer(ghost, Identity.generate().public, silent.getsockname())
            async with httpx.AsyncClient(transport=OverlayTransport(node)) as client:
                with anyio.fail_after(3), pytest.raises(httpx.ConnectTimeout) as info:
                    await client.post(
                        f"http://{ghost.host}/",
                        content=body,
                        timeout=httpx.Timeout(5, connect=1 if handshake_timeout < 1 else 0.3),
                    )
                if handshake_timeout < 1:
                    assert "no handshake answer from 1:0001.0000.0099" in str(info.value)
                else:
                    assert str(info.value) == "connect timeout (1:0001.0000.0099 port 80)"
                # The failed connection left the pool (with the request queued on it).
                transport = client._transport
                assert isinstance(transport, OverlayTransport)
                assert not transport._connections
    finally:
        silent.close()


async def test_a_refused_handshake_is_a_connect_error_for_a_request_made_during_it(
    overlay_node_factory,  # type: ignore[no-untyped-def]
) -> None:
    server = await overlay_node_factory(trust=lambda identity, address: False)
    client_node = await overlay_node_factory()
    async with anyio.create_task_group() as tg:
        await tg.start(functools.partial(serve, make_app(), server))
        async with httpx.AsyncClient(transport=OverlayTransport(client_node)) as client:
            with anyio.fail_after(5), pytest.raises(httpx.ConnectError, match="refused"):
                await client.post(f"http://{server.address.host}/v1/completions", json={})
        tg.cancel_scope.cancel()


async def test_pool_timeout_when_streams_are_exhausted(
    overlay_node_factory,  # type: ignore[no-untyped-def]
) -> None:
    server, client_node = await overlay_node_factory(), await overlay_node_factory()
    async with anyio.create_task_group() as tg:
        await tg.start(functools.partial(serve, make_app(), server, max_concurrent_streams=1))
        async with httpx.AsyncClient(
            transport=OverlayTransport(client_node), base_url=f"http://{server.address.host}"
        ) as client:
            await client.get("/whoami")  # learn the server's SETTINGS
            async with client.stream("GET", "/tokens"):
                with pytest.raises(httpx.PoolTimeout):
                    await client.get("/whoami", timeout=httpx.Timeout(5, pool=0.2))
            r = await client.get("/whoami")  # the slot came back when the stream closed
            assert r.status_code == 200
        tg.cancel_scope.cancel()


async def test_clear_errors_for_unknown_peer_refused_port_and_wrong_urls(
    overlay_pair,  # type: ignore[no-untyped-def]
) -> None:
    a, b = overlay_pair
    async with httpx.AsyncClient(transport=OverlayTransport(a)) as client:
        with pytest.raises(httpx.ConnectError, match=r"unknown peer 1:0001\.dead\.beef"):
            await client.get("http://1-0001-dead-beef.overlay/")
        with pytest.raises(httpx.ConnectError, match="nobody listens on overlay port 81"):
            await client.get(f"http://{b.address.host}:81/")
        with pytest.raises(httpx.ConnectError, match="not an overlay host"):
            await client.get("http://example.com/")
        with pytest.raises(httpx.UnsupportedProtocol, match="http://"):
            await client.get(f"https://{b.address.host}/")
        with pytest.raises(httpx.ConnectError, match="expected"):
            await client.get("http://not-an-address.overlay/")


async def test_a_server_that_restarts_mid_run(overlay_node_factory) -> None:  # type: ignore[no-untyped-def]
    identity = Identity.generate()
    client_node = await overlay_node_factory()
    app = make_app()
    first = Node(identity)
    await first.__aenter__()
    client_node.add_peer(first.address, first.public, first.endpoint)
    url = f"http://{first.address.host}/v1/completions"
    async with httpx.AsyncClient(transport=OverlayTransport(client_node)) as client:
        async with anyio.create_task_group() as tg:
            await tg.start(functools.partial(serve, app, first))
            assert (await client.post(url, json={"n": 1})).status_code == 200
            where = first.endpoint
            assert first._udp is not None
            first._udp.close()  # crash: no CLOSE reaches the client
            first._linger = 0
            tg.cancel_scope.cancel()
        await first.aclose()
        async with Node(identity, bind=where) as second, anyio.create_task_group() as tg:
            await tg.start(functools.partial(serve, app, second))
            with anyio.fail_after(10):
                r = await client.post(url, json={"n": 2})
            assert r.json()["echo"] == {"n": 2}
            tg.cancel_scope.cancel()


async def test_graceful_server_shutdown_finishes_the_request_in_flight(
    overlay_node_factory,  # type: ignore[no-untyped-def]
) -> None:
    from overlay_httpx import OverlayServer

    started, release = anyio.Event(), anyio.Event()
    app = FastAPI()

    @app.get("/work")
    async def work() -> dict[str, str]:
        started.set()
        await release.wait()
        return {"done": "yes"}

    server_node, client_node = await overlay_node_factory(), await overlay_node_factory()
    server = OverlayServer(app, server_node)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        async with httpx.AsyncClient(
            transport=OverlayTransport(client_node), base_url=f"http://{server_node.address.host}"
        ) as client:
            result: dict[str, httpx.Response] = {}
            done = anyio.Event()

            async def call() -> None:
                result["r"] = await client.get("/work")
                done.set()

            tg.start_soon(call)
            await started.wait()
            tg.start_soon(server.shutdown)  # GOAWAY now; the request in flight may finish
            await anyio.wait_all_tasks_blocked()  # the client has read the GOAWAY
            release.set()
            with anyio.fail_after(5):
                await done.wait()
            assert result["r"].json() == {"done": "yes"}


async def test_a_refused_stream_is_retried_once_and_the_attempts_are_reported(
    overlay_node_factory,  # type: ignore[no-untyped-def]
) -> None:
    """A raw HTTP/2 server that refuses the first request (REFUSED_STREAM: it never
    began it) and answers the second; the transport retries and says so."""
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events

    server_node, client_node = await overlay_node_factory(), await overlay_node_factory()
    listener = await server_node.listen(80)
    seen: list[int] = []

    async def raw_server(stream) -> None:  # type: ignore[no-untyped-def]
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        await stream.send(conn.data_to_send())
        with contextlib.suppress(anyio.BrokenResourceError):  # the client closes at the end
            await _refuse_first(conn, stream)

    async def _refuse_first(conn, stream) -> None:  # type: ignore[no-untyped-def]
        async for data in stream:
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    seen.append(event.stream_id)
                    if len(seen) == 1:
                        conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    else:
                        conn.send_headers(event.stream_id, [(":status", "200")])
                        conn.send_data(event.stream_id, b"second time", end_stream=True)
            await stream.send(conn.data_to_send())

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, raw_server)
        async with httpx.AsyncClient(transport=OverlayTransport(client_node)) as client:
            r = await client.get(f"http://{server_node.address.host}/")
            assert r.text == "second time"
            assert r.extensions["overlay"]["attempts"] == 2
            assert len(seen) == 2
        tg.cancel_scope.cancel()


async def test_a_body_unlike_its_content_length_is_refused_before_it_leaves(
    overlay_app_client,  # type: ignore[no-untyped-def]
) -> None:
    client = await overlay_app_client(make_app())
    for declared in ("5", "x", "3, 3"):
        with pytest.raises(httpx.LocalProtocolError, match=f"content-length is '{declared}'"):
            await client.post("/upload", content=b"abc", headers={"content-length": declared})
    r = await client.post("/v1/completions", json={"prompt": "hi"})  # the connection is fine
    assert r.status_code == 200


async def test_a_server_ending_the_connection_over_an_error_is_a_remote_protocol_error(
    overlay_app_client,  # type: ignore[no-untyped-def]
) -> None:
    """A streamed body shorter than its content-length: the server's h2 answers with
    GOAWAY (PROTOCOL_ERROR) for the request it had begun, which is an httpx error."""
    client = await overlay_app_client(make_app())

    async def short() -> AsyncIterator[bytes]:
        yield b"abc"

    with pytest.raises(httpx.RemoteProtocolError, match="ended the connection: PROTOCOL_ERROR"):
        await client.post("/upload", content=short(), headers={"content-length": "5"})
    r = await client.post("/v1/completions", json={"prompt": "hi"})  # on a new connection
    assert r.status_code == 200
