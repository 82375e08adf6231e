"""pytest fixtures for code built on overlay_httpx (registered through ``pytest11``).

Two nodes on 127.0.0.1 in one line, on asyncio and trio (anyio's pytest
plugin runs them; mark tests with ``@pytest.mark.anyio``)::

    @pytest.mark.anyio
    async def test_health(overlay_app_client):
        client = await overlay_app_client(app)          # app served on overlay port 80
        assert (await client.get("/health")).status_code == 200

* `overlay_node_factory` — ``await make(**node_options)`` starts a node on
  127.0.0.1 that knows (and is known by) every node the factory made before.
* `overlay_pair` — two such nodes, ``(a, b)``.
* `overlay_app_client` — ``await make(app, **client_options)`` serves an ASGI
  app on a fresh node and returns an ``httpx.AsyncClient`` on another,
  with ``base_url`` pointing at the app, wired through the overlay.

Everything is closed when the test ends; call the factories at the top
level of the test (not inside a task group the test closes itself), since
what they start lives until the fixture's teardown. Importing this module
costs nothing: the library is imported when a fixture is first used.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import httpx

    from overlay_httpx import Node

__all__ = ["overlay_app_client", "overlay_node_factory", "overlay_pair"]

NodeFactory = Callable[..., Awaitable["Node"]]
AppClientFactory = Callable[..., Awaitable["httpx.AsyncClient"]]


async def _start_node(stack: AsyncExitStack, known: list[Node], **options: Any) -> Node:
    """A node on 127.0.0.1, introduced to every node in `known` (and added to it)."""
    from overlay_httpx import Identity, Node

    options.setdefault("bind", "127.0.0.1:0")
    identity = options.pop("identity", None) or Identity.generate()
    node = await stack.enter_async_context(Node(identity, **options))
    for other in known:
        node.add_peer(other.address, other.public, other.endpoint)
        other.add_peer(node.address, node.public, node.endpoint)
    known.append(node)
    return node


@pytest.fixture
async def overlay_node_factory() -> AsyncIterator[NodeFactory]:
    known: list[Node] = []
    async with AsyncExitStack() as stack:

        async def make(**options: Any) -> Node:
            return await _start_node(stack, known, **options)

        yield make


@pytest.fixture
async def overlay_pair(overlay_node_factory: NodeFactory) -> tuple[Node, Node]:
    return await overlay_node_factory(), await overlay_node_factory()


@pytest.fixture
async def overlay_app_client() -> AsyncIterator[AppClientFactory]:
    import anyio
    import httpx

    from overlay_httpx import OverlayTransport, serve

    async with AsyncExitStack() as stack:

        async def make(app: Any, *, port: int = 80, **client_options: Any) -> httpx.AsyncClient:
            # Each app gets its own nodes and task group, closed in reverse order:
            # client, then the server task, then the nodes.
            own = await stack.enter_async_context(AsyncExitStack())
            known: list[Node] = []
            server = await _start_node(own, known)
            client_node = await _start_node(own, known)
            group = await own.enter_async_context(anyio.create_task_group())
            own.callback(group.cancel_scope.cancel)
            await group.start(functools.partial(serve, app, server, port=port))
            base = f"http://{server.address.host}" + ("" if port == 80 else f":{port}")
            client_options.setdefault("base_url", base)
            transport = OverlayTransport(client_node)
            return await own.enter_async_context(
                httpx.AsyncClient(transport=transport, **client_options)
            )

        yield make
