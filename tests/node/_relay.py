"""A userspace impairment relay: a UDP proxy between two nodes with seeded loss,
duplication, reordering and delay (``tc netem`` is not available here)."""

from __future__ import annotations

import heapq
import random
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType

import anyio

from overlay_httpx import Node
from overlay_httpx._node._udp import UdpSocket

Addr = tuple[str, int]


@dataclass
class RelayStatistics:
    forwarded: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    by_direction: dict[str, int] = field(default_factory=dict)


class ImpairmentRelay:
    """Node A talks to ``relay.toward_b`` and node B to ``relay.toward_a``.

    Each datagram is dropped with probability `loss`, sent twice with
    probability `duplicate`, and held back by an extra `reorder_delay` with
    probability `reorder` so later datagrams overtake it; every datagram is
    delayed by `delay` seconds. Random choices come from one seeded generator.
    """

    def __init__(
        self,
        *,
        seed: int,
        loss: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        delay: float = 0.0,
        reorder_delay: float = 0.002,
    ) -> None:
        self._random = random.Random(seed)
        self.loss, self.duplicate, self.reorder = loss, duplicate, reorder
        self.delay, self.reorder_delay = delay, reorder_delay
        self.stats = RelayStatistics()
        self._queue: list[tuple[float, int, UdpSocket, bytes, Addr]] = []
        self._seq = 0
        self._wake: anyio.Event | None = None
        self._a: Addr | None = None  # where node A's datagrams come from (learned)
        self._b: Addr | None = None
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> ImpairmentRelay:
        self._toward_b = UdpSocket(("127.0.0.1", 0), self._from_a, _nothing)
        self._toward_a = UdpSocket(("127.0.0.1", 0), self._from_b, _nothing)
        group = await self._stack.enter_async_context(anyio.create_task_group())
        self._group = group
        group.start_soon(self._pump)
        self._toward_a.start(group)
        self._toward_b.start(group)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._group.cancel_scope.cancel()
        await self._stack.aclose()
        self._toward_a.close()
        self._toward_b.close()

    def wire(self, a: Node, b: Node) -> None:
        """Introduce A and B to each other through the relay."""
        self._a, self._b = a.endpoint, b.endpoint
        a.add_peer(b.address, b.public, self._toward_b.local_endpoint)
        b.add_peer(a.address, a.public, self._toward_a.local_endpoint)

    def _from_a(self, data: bytes, addr: Addr) -> None:
        self._a = addr
        if self._b is not None:
            self._forward(self._toward_a, data, self._b, "a->b")

    def _from_b(self, data: bytes, addr: Addr) -> None:
        self._b = addr
        if self._a is not None:
            self._forward(self._toward_b, data, self._a, "b->a")

    def _forward(self, sock: UdpSocket, data: bytes, dest: Addr, direction: str) -> None:
        rnd = self._random
        if rnd.random() < self.loss:
            self.stats.dropped += 1
            return
        copies = 2 if rnd.random() < self.duplicate else 1
        self.stats.duplicated += copies - 1
        for _ in range(copies):
            extra = 0.0
            if rnd.random() < self.reorder:
                extra = self.reorder_delay
                self.stats.reordered += 1
            if self.delay == 0 and extra == 0:
                sock.sendto(data, dest)
            else:
                self._seq += 1
                due = anyio.current_time() + self.delay + extra
                heapq.heappush(self._queue, (due, self._seq, sock, data, dest))
                if self._wake is not None:
                    self._wake.set()
            self.stats.forwarded += 1
            self.stats.by_direction[direction] = self.stats.by_direction.get(direction, 0) + 1

    async def _pump(self) -> None:
        while True:
            if not self._queue:
                self._wake = anyio.Event()
                await self._wake.wait()
                self._wake = None
                continue
            due = self._queue[0][0]
            now = anyio.current_time()
            if due > now:
                with anyio.move_on_after(due - now):
                    self._wake = anyio.Event()
                    await self._wake.wait()
                self._wake = None
                continue
            while self._queue and self._queue[0][0] <= now:
                _, _, sock, data, dest = heapq.heappop(self._queue)
                sock.sendto(data, dest)


def _nothing() -> None:
    return None
