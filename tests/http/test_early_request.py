"""The first request to a new peer is made during the handshake round trip.

What that must not change: a connect error still means the request was never
sent, whatever else shares the connection, and a request that waits for a
stream slot or for flow control before the handshake ends still gets the
handshake's error.
"""

from __future__ import annotations

import collections
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import httpx
import pytest
from fastapi import FastAPI

from overlay_httpx import Address, Identity, Node, OverlayTransport, serve
from overlay_httpx._identity import default_address

pytestmark = pytest.mark.anyio


def _recording_app(hits: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/charge")
    async def charge(body: dict[str, str]) -> dict[str, bool]:
        hits.append(body["who"])
        return {"ok": True}

    return app


@asynccontextmanager
async def _silent_peer(client: Node, identity: Identity | None = None) -> AsyncIterator[Address]:
    """A peer whose UDP port never answers; yields its overlay address."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    public = (identity or Identity.generate()).public
    address = default_address(public)
    client.add_peer(address, public, silent.getsockname())
    try:
        yield address
    finally:
        silent.close()


@pytest.mark.parametrize("how", ["connect timeout", "cancelled"])
async def test_a_request_given_up_during_the_handshake_never_reaches_the_server(how: str) -> None:
    """The request waits in the tunnel for the keys; once given up it must never leave,
    even if the server answers a later retry of the same handshake."""
    hits: list[str] = []
    server_identity = Identity.generate()
    async with Node(Identity.generate(), handshake_timeout=10) as client_node:
        transport = OverlayTransport(client_node)
        async with httpx.AsyncClient(transport=transport) as client:
            silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            silent.bind(("127.0.0.1", 0))
            port = silent.getsockname()[1]
            address = default_address(server_identity.public)
            client_node.add_peer(address, server_identity.public, ("127.0.0.1", port))
            url = f"http://{address.host}/charge"
            if how == "cancelled":
                with anyio.move_on_after(0.3) as scope:
                    await client.post(url, json={"who": "given up"})
                assert scope.cancelled_caught
            else:
                with pytest.raises(httpx.ConnectTimeout):
                    await client.post(
                        url, json={"who": "given up"}, timeout=httpx.Timeout(5, connect=0.3)
                    )
            assert not transport._connections  # the connection went with it
            silent.close()
            # The server comes up where the client's handshake retries go.
            async with (
                Node(server_identity, bind=f"127.0.0.1:{port}") as server,
                anyio.create_task_group() as tg,
            ):
                await tg.start(serve, _recording_app(hits), server)
                with anyio.fail_after(5):  # the tunnel's next INIT reaches it
                    for who in ("second", "third"):
                        r = await client.post(url, json={"who": who})
                        assert r.json() == {"ok": True}
                assert hits == ["second", "third"]
                tg.cancel_scope.cancel()


async def test_a_cancelled_reader_does_not_strand_the_responses_of_others(
    overlay_pair: tuple[Node, Node],
) -> None:
    """One task reads for every request of a connection; cancelling it (here its read
    timeout) must hand the reading on, not leave the others asleep."""
    server, client_node = overlay_pair
    arrived = {name: anyio.Event() for name in ("a", "b")}
    release_b = anyio.Event()
    app = FastAPI()

    @app.get("/wait/{name}")
    async def wait(name: str) -> dict[str, str]:
        arrived[name].set()
        if name == "b":
            await release_b.wait()
        else:
            await anyio.sleep_forever()
        return {"name": name}

    outcome: dict[str, object] = {}
    done = {name: anyio.Event() for name in ("a", "b")}

    async def get(name: str, read: float) -> None:
        try:
            r = await client.get(f"/wait/{name}", timeout=httpx.Timeout(10, read=read))
            outcome[name] = r.json()
        except httpx.HTTPError as exc:
            outcome[name] = exc
        done[name].set()

    async with anyio.create_task_group() as tg:
        await tg.start(serve, app, server)
        async with httpx.AsyncClient(
            transport=OverlayTransport(client_node), base_url=f"http://{server.address.host}"
        ) as client:
            async with anyio.create_task_group() as requests:
                requests.start_soon(get, "a", 0.3)  # the first to wait reads for both
                await arrived["a"].wait()
                requests.start_soon(get, "b", 10)
                await arrived["b"].wait()
                await done["a"].wait()
                assert isinstance(outcome["a"], httpx.ReadTimeout)
                release_b.set()
                with anyio.fail_after(3):  # not b's 10 s read timeout
                    await done["b"].wait()
            assert outcome["b"] == {"name": "b"}
        tg.cancel_scope.cancel()


async def test_bodies_past_the_shared_window_wait_for_the_handshake() -> None:
    """Six 16 KiB bodies: the first few fit the connection's first window and are sent
    during the handshake, the rest wait for it; to a silent peer every one of them is
    a ConnectTimeout, none a write timeout."""
    async with (
        Node(Identity.generate(), handshake_timeout=10) as client_node,
        _silent_peer(client_node) as ghost,
    ):
        timeout = httpx.Timeout(5, connect=0.3, write=2)
        outcomes: collections.Counter[str] = collections.Counter()
        async with httpx.AsyncClient(
            transport=OverlayTransport(client_node), timeout=timeout
        ) as client:

            async def post() -> None:
                try:
                    await client.post(f"http://{ghost.host}/", content=b"x" * 16384)
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1

            with anyio.fail_after(3):
                async with anyio.create_task_group() as tg:
                    for _ in range(6):
                        tg.start_soon(post)
    assert outcomes == {"ConnectTimeout": 6}


@pytest.mark.parametrize("refuse", [False, True], ids=["dead peer", "refusing peer"])
async def test_requests_waiting_for_a_stream_slot_get_the_handshake_error(refuse: bool) -> None:
    """Until the server's SETTINGS arrive a connection takes 100 requests; the rest wait
    for a slot. When the handshake fails they fail as the others do, not as
    "refused by the server" (RemoteProtocolError), even with no retries."""
    outcomes: collections.Counter[str] = collections.Counter()
    async with AsyncExitStack() as stack:
        client_node = await stack.enter_async_context(
            Node(Identity.generate(), handshake_timeout=0.3)
        )
        if refuse:
            server_node = await stack.enter_async_context(
                Node(Identity.generate(), trust=lambda identity, address: False)
            )
            client_node.add_peer(server_node.address, server_node.public, server_node.endpoint)
            target = server_node.address
        else:
            target = await stack.enter_async_context(_silent_peer(client_node))
        client = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=OverlayTransport(client_node, retries=0),
                timeout=httpx.Timeout(5, connect=1),
            )
        )

        async def get() -> None:
            try:
                await client.get(f"http://{target.host}/")
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1

        with anyio.fail_after(3):
            async with anyio.create_task_group() as tg:
                for _ in range(102):
                    tg.start_soon(get)
    assert outcomes == {("ConnectError" if refuse else "ConnectTimeout"): 102}
