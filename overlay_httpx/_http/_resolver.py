"""`NodeResolver`: URL hosts to overlay addresses, with the node's rendezvous for names and tags.

Three host forms, all under ``.overlay`` (httpx lowercases hosts):

* ``1-0001-0001-0001.overlay``: an address, no look-up;
* ``<tag>.tag.overlay``: every live node carrying the tag, in a rotating order
  so that requests spread over them;
* ``<hostname>.overlay``: the node registered under that name.

Answers are cached briefly (`ttl`), so a busy client does not ask the
rendezvous once per request; the transport skips nodes whose tunnel fails.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Final

import anyio

from .._address import Address
from .._exceptions import AddressError, LocalProtocolError, RendezvousUnavailable
from .._node import Node

__all__ = ["NodeResolver"]

_TAG_SUFFIX: Final = ".tag.overlay"
_SUFFIX: Final = ".overlay"
_FAILED_FOR: Final = 30.0  # seconds a node whose tunnel failed is tried last


class NodeResolver:
    """Resolve overlay hosts through `node` (names and tags need ``Node(rendezvous=...)``)."""

    def __init__(self, node: Node, *, ttl: float = 5.0) -> None:
        self._node = node
        self._ttl = ttl
        self._cache: dict[str, tuple[float, list[Address]]] = {}
        self._turn = itertools.count()
        self._failed: dict[Address, float] = {}
        self._inflight: dict[str, anyio.Event] = {}

    async def resolve(self, host: str) -> Sequence[Address]:
        host = host.lower()
        if not host.endswith(_SUFFIX):
            raise AddressError(f"{host!r} is not an overlay host (expected '<...>.overlay')")
        try:
            return [Address.from_host(host)]
        except AddressError as exc:
            if self._node.rendezvous is None:
                raise AddressError(
                    f"{exc}; names and tags (<name>.overlay, <tag>.tag.overlay) are looked up "
                    "at a rendezvous, and this node has none"
                ) from None
        now = anyio.current_time()
        cached = self._cache.get(host)
        if cached is not None and cached[0] > now:
            addresses = cached[1]
        else:
            addresses = await self._refresh(host, cached)
            now = anyio.current_time()
        if len(addresses) > 1:  # spread requests: each call starts one further along
            start = next(self._turn) % len(addresses)
            addresses = addresses[start:] + addresses[:start]
            if self._failed:  # nodes whose tunnel failed lately go last
                addresses.sort(key=lambda a: self._failed.get(a, 0.0) > now)
        return addresses

    def failed(self, address: Address) -> None:
        """The transport could not reach `address`: try it last for a while."""
        self._failed[address] = anyio.current_time() + _FAILED_FOR
        if len(self._failed) > 1024:
            now = anyio.current_time()
            self._failed = {a: t for a, t in self._failed.items() if t > now}

    async def _refresh(self, host: str, stale: tuple[float, list[Address]] | None) -> list[Address]:
        """One look-up per host at a time; the last answer while the rendezvous is away."""
        waiting = self._inflight.get(host)
        if waiting is not None:  # someone is asking already: share the answer
            await waiting.wait()
            cached = self._cache.get(host)
            if cached is not None:
                return cached[1]
        done = self._inflight[host] = anyio.Event()
        try:
            addresses = await self._look_up(host)
        except RendezvousUnavailable:
            if stale is None:
                raise
            return stale[1]  # names and tags rarely change: serve stale (as RFC 8767 does)
        finally:
            del self._inflight[host]
            done.set()
        self._cache[host] = (anyio.current_time() + self._ttl, addresses)
        return addresses

    async def _look_up(self, host: str) -> list[Address]:
        if host.endswith(_TAG_SUFFIX):
            tag = host[: -len(_TAG_SUFFIX)]
            if not tag or "." in tag:
                raise LocalProtocolError(f"{host!r}: expected '<tag>.tag.overlay' with one tag")
            return [record.address for record in await self._node.find_by_tag(tag)]
        record = await self._node.resolve(host[: -len(_SUFFIX)])
        return [record.address]

    def forget(self, host: str) -> None:
        """Drop a cached answer (e.g. after every node it named failed)."""
        self._cache.pop(host.lower(), None)
