"""OverlayTransport with a rendezvous: <hostname>.overlay and <tag>.tag.overlay URLs."""

from __future__ import annotations

import functools
from collections import Counter

import anyio
import httpx
import pytest

from overlay_httpx import Identity, Node, OverlayTransport, Rendezvous, serve

pytestmark = pytest.mark.anyio


def _app(name: str):  # type: ignore[no-untyped-def]
    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": name.encode()})

    return app


async def test_tag_urls_spread_requests_and_skip_nodes_that_are_gone() -> None:
    async with Rendezvous() as rv, anyio.create_task_group() as group:
        client_node = await group.start(_node, rv.spec, [], None, 1.0)
        stop_one, one_closed = anyio.Event(), anyio.Event()
        await group.start(_node, rv.spec, ["model-service"], "one", 5.0, stop_one, one_closed)
        await group.start(_node, rv.spec, ["model-service"], "two")
        async with httpx.AsyncClient(transport=OverlayTransport(client_node)) as client:
            seen = Counter(
                [(await client.get("http://model-service.tag.overlay/")).text for _ in range(6)]
            )
            assert seen == {"one": 3, "two": 3}  # spread evenly over both
            assert (await client.get("http://two.overlay/")).text == "two"  # by hostname
            stop_one.set()  # node one goes away (the client may still have its record cached)
            await one_closed.wait()
            answers = [
                (await client.get("http://model-service.tag.overlay/")).text for _ in range(4)
            ]
            assert answers == ["two"] * 4
            with pytest.raises(httpx.ConnectError, match="no live node has hostname 'nobody'"):
                await client.get("http://nobody.overlay/")
            with pytest.raises(httpx.ConnectError, match="no live overlay node serves"):
                await client.get("http://nothing.tag.overlay/")
        group.cancel_scope.cancel()


async def _node(  # type: ignore[no-untyped-def]
    spec: str,
    tags: list[str],
    hostname: str | None,
    handshake_timeout: float = 5.0,
    stop: anyio.Event | None = None,
    closed: anyio.Event | None = None,
    *,
    task_status,
) -> None:
    async with (
        Node(
            Identity.generate(),
            rendezvous=spec,
            tags=tags,
            hostname=hostname,
            handshake_timeout=handshake_timeout,
        ) as node,
        anyio.create_task_group() as group,
    ):
        if hostname is not None:  # a server: the app answers with its name
            await group.start(functools.partial(serve, _app(hostname), node))
        task_status.started(node)
        await (stop or anyio.Event()).wait()
        group.cancel_scope.cancel()
    if closed is not None:
        closed.set()


async def test_names_are_served_stale_while_the_rendezvous_is_away() -> None:
    from overlay_httpx import NodeResolver

    stop, stopped = anyio.Event(), anyio.Event()

    async def rendezvous(*, task_status) -> None:  # type: ignore[no-untyped-def]
        async with Rendezvous() as rv:
            task_status.started(rv)
            await stop.wait()
        stopped.set()

    async with anyio.create_task_group() as group:
        rv = await group.start(rendezvous)
        server = await group.start(_node, rv.spec, ["model-service"], "svc")
        client = await group.start(_node, rv.spec, [], None)
        resolver = NodeResolver(client, ttl=0.0)  # every call asks again
        assert list(await resolver.resolve("svc.overlay")) == [server.address]
        stop.set()
        await stopped.wait()
        with anyio.fail_after(10):  # the rendezvous is gone: the last answer still serves
            assert list(await resolver.resolve("svc.overlay")) == [server.address]
        group.cancel_scope.cancel()
