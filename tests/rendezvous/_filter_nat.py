"""A userspace stand-in for a strict NAT in front of one node, on 127.0.0.1.

The node talks to the rendezvous only through ``inside`` (its rendezvous spec
names that port); the rendezvous sees the node at ``outside``, as if that
were its public endpoint. Datagrams reaching ``outside`` from anyone but the
rendezvous are dropped, like a symmetric NAT's filter: peers can reach the
node only through the relay.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from types import TracebackType

import anyio

from overlay_httpx._node._udp import UdpSocket

Addr = tuple[str, int]


class FilteringNat:
    def __init__(self, rendezvous: Addr) -> None:
        self.rendezvous = rendezvous
        self.inside_peer: Addr | None = None  # the node's socket, learned from its first datagram
        self.blocked = 0
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> FilteringNat:
        self._inside = UdpSocket(("127.0.0.1", 0), self._from_node, _nothing)
        self._outside = UdpSocket(("127.0.0.1", 0), self._from_world, _nothing)
        group = await self._stack.enter_async_context(anyio.create_task_group())
        self._group = group
        self._inside.start(group)
        self._outside.start(group)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._group.cancel_scope.cancel()
        await self._stack.aclose()
        self._inside.close()
        self._outside.close()

    @property
    def inside(self) -> Addr:
        return self._inside.local_endpoint

    @property
    def outside(self) -> Addr:
        return self._outside.local_endpoint

    def _from_node(self, data: bytes, addr: Addr) -> None:
        self.inside_peer = addr
        self._outside.sendto(data, self.rendezvous)

    def _from_world(self, data: bytes, addr: Addr) -> None:
        if addr != self.rendezvous or self.inside_peer is None:
            self.blocked += 1
            return
        self._inside.sendto(data, self.inside_peer)


def _nothing() -> None:
    return None
