"""The first request to a new peer is made during the handshake round trip.

What that must not change: a connect error still means the request was never
sent, whatever else shares the connection, and a request that waits for a
stream slot or for flow control before the handshake ends still gets the
handshake's error.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import httpx
import pytest
from _peers import SilentPeer
from fastapi import FastAPI, Request

from overlay_httpx import Address, Identity, Node, OverlayTransport, serve

pytestmark = pytest.mark.anyio


def _recording_app(hits: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/charge")
    async def charge(who: str) -> dict[str, bool]:
        hits.append(who)  # on entry, the body unread: a request begun at all is seen
        return {"ok": True}

    return app


async def _failures(count: int, call: Callable[[], Awaitable[object]]) -> collections.Counter[str]:
    """Run `call` `count` times at once (within 3 s); how many failed with which error."""
    outcomes: collections.Counter[str] = collections.Counter()

    async def one() -> None:
        try:
            await call()
        except httpx.HTTPError as exc:
            outcomes[type(exc).__name__] += 1

    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(one)
    return outcomes


class _LatePeer:
    """A peer that does not answer at first, then comes up where the client's
    handshake retries go: requests made meanwhile wait in the tunnel for the keys."""

    def __init__(self, client: Node, app: FastAPI) -> None:
        self._app = app
        self._silent = SilentPeer(client)
        self.address = self._silent.address

    @asynccontextmanager
    async def up(self) -> AsyncIterator[None]:
        self._silent.close()
        async with (
            Node(self._silent.identity, bind=f"127.0.0.1:{self._silent.port}") as server,
            anyio.create_task_group() as tg,
        ):
            await tg.start(serve, self._app, server)
            yield
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("how", ["connect timeout", "cancelled"])
async def test_a_request_given_up_during_the_handshake_never_reaches_the_server(how: str) -> None:
    """The request waits in the tunnel for the keys; once given up it must never leave,
    even if the server answers a later retry of the same handshake."""
    hits: list[str] = []
    async with Node(Identity.generate(), handshake_timeout=10) as client_node:
        peer = _LatePeer(client_node, _recording_app(hits))
        transport = OverlayTransport(client_node)
        async with httpx.AsyncClient(transport=transport) as client:
            url = f"http://{peer.address.host}/charge"
            if how == "cancelled":
                with anyio.move_on_after(0.3) as scope:
                    await client.post(url, params={"who": "given up"}, json={})
                assert scope.cancelled_caught
            else:
                with pytest.raises(httpx.ConnectTimeout):
                    await client.post(
                        url,
                        params={"who": "given up"},
                        json={},
                        timeout=httpx.Timeout(5, connect=0.3),
                    )
            assert not transport._connections  # the connection went with it
            async with peer.up():
                with anyio.fail_after(5):  # the tunnel's next INIT reaches it
                    for who in ("second", "third"):
                        r = await client.post(url, params={"who": who}, json={})
                        assert r.json() == {"ok": True}
                assert hits == ["second", "third"]


class _TwoCandidates:
    """Resolves ``both.overlay`` to two candidates (the same node twice): a request to it
    waits for the handshake before it is made, to move on if that fails."""

    def __init__(self, address: Address) -> None:
        self._address = address

    async def resolve(self, host: str) -> list[Address]:
        if host == "both.overlay":
            return [self._address, self._address]
        return [Address.from_host(host)]


@pytest.mark.parametrize("body", ["none", "streamed", "by name"])
async def test_a_neighbour_given_up_in_the_handshake_costs_a_request_nothing(body: str) -> None:
    """Two requests share a new connection; one is cancelled during the handshake, which
    gives the connection up. The other was never sent either: it moves to a fresh
    connection and succeeds, with no retries allowed, with a body that cannot be
    replayed, or when it waits for the handshake before it is made (a host with
    several candidates), and the server sees it once."""
    hits: list[str] = []
    app = FastAPI()

    @app.post("/up")
    async def up(request: Request) -> dict[str, int]:
        hits.append(f"up {len(await request.body())}")
        return {"ok": 1}

    @app.get("/get")
    async def get() -> dict[str, int]:
        hits.append("get")
        return {"ok": 1}

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 500

    async with Node(Identity.generate(), handshake_timeout=10) as client_node:
        peer = _LatePeer(client_node, app)
        async with httpx.AsyncClient(
            transport=OverlayTransport(
                client_node, retries=0, resolver=_TwoCandidates(peer.address)
            ),
            base_url=f"http://{peer.address.host}",
            timeout=10,
        ) as client:
            given_up, answered = anyio.Event(), anyio.Event()
            answer: list[httpx.Response] = []

            async def neighbour() -> None:
                with anyio.move_on_after(0.3):
                    await client.get("/get")
                given_up.set()

            async def request() -> None:
                if body == "streamed":
                    answer.append(await client.post("/up", content=chunks()))
                elif body == "by name":
                    answer.append(await client.get("http://both.overlay/get"))
                else:
                    answer.append(await client.get("/get"))
                answered.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(neighbour)  # first: it makes the connection, ...
                tg.start_soon(request)  # ... which this one shares
                await given_up.wait()
                async with peer.up():
                    with anyio.fail_after(5):
                        await answered.wait()
            (response,) = answer
            assert response.status_code == 200
            assert response.extensions["overlay"]["attempts"] == 1
            assert hits == (["up 2000"] if body == "streamed" else ["get"])
            assert response.extensions["overlay"]["peer_address"] == peer.address


async def test_closing_the_client_during_the_handshake_sends_nothing_later() -> None:
    """The transport closes while a request waits for the keys, and its node lives on
    (shared): what waited must not leave once the handshake completes."""
    hits: list[str] = []
    async with Node(Identity.generate(), handshake_timeout=10) as client_node:
        peer = _LatePeer(client_node, _recording_app(hits))
        client = httpx.AsyncClient(transport=OverlayTransport(client_node))
        url = f"http://{peer.address.host}/charge"
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(client.post, url, params={"who": "closed"}, json={}))
            await anyio.wait_all_tasks_blocked()  # the request waits for the keys
            await client.aclose()
            tg.cancel_scope.cancel()
        async with peer.up(), httpx.AsyncClient(transport=OverlayTransport(client_node)) as again:
            with anyio.fail_after(5):
                r = await again.post(url, params={"who": "again"}, json={})
            assert r.status_code == 200
            assert hits == ["again"]


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
    timeout = httpx.Timeout(5, connect=0.3, write=2)
    async with Node(Identity.generate(), handshake_timeout=10) as client_node:
        with SilentPeer(client_node) as silent:
            async with httpx.AsyncClient(
                transport=OverlayTransport(client_node), timeout=timeout
            ) as client:
                url = f"http://{silent.address.host}/"
                post = functools.partial(client.post, url, content=b"x" * 16384)
                assert await _failures(6, post) == {"ConnectTimeout": 6}


@pytest.mark.parametrize("refuse", [False, True], ids=["dead peer", "refusing peer"])
async def test_requests_waiting_for_a_stream_slot_get_the_handshake_error(refuse: bool) -> None:
    """Until the server's SETTINGS arrive a connection takes 100 requests; the rest wait
    for a slot. When the handshake fails they fail as the others do, not as
    "refused by the server" (RemoteProtocolError), even with no retries."""
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
            target = stack.enter_context(SilentPeer(client_node)).address
        client = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=OverlayTransport(client_node, retries=0),
                timeout=httpx.Timeout(5, connect=1),
            )
        )
        outcomes = await _failures(102, functools.partial(client.get, f"http://{target.host}/"))
    assert outcomes == {("ConnectError" if refuse else "ConnectTimeout"): 102}
