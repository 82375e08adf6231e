"""`Rendezvous`: the registry, discovery, hole-punching coordinator and relay of a network.

The rendezvous is an ordinary overlay node. Nodes open one stream to its
registry port over a Noise tunnel, so a registration is proof of possession
of the key it names: nobody can register someone else's key. It sees each
node's public UDP endpoint from the same socket the node uses for its peers
(STUN-style), tells two peers about each other when one wants to connect,
and forwards RELAY datagrams between registered nodes when no direct path
works: still end to end encrypted, it sees only ciphertext. Relaying is
rate-limited per node with a token bucket; a node that exceeds it sees loss
and its congestion control slows down, so a large body is slowed, never cut.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final

import anyio

from .._address import Address
from .._exceptions import (
    AddressTaken,
    NotRegistered,
    OverlayError,
    RegistryError,
    RegistryProtocolError,
)
from .._identity import Identity, PublicIdentity, default_address
from .._node._node import Node
from .._node._stream import OverlayAttribute, OverlayStream
from .._protocol._bucket import TokenBucket
from .._protocol._packet import RELAY_OVERHEAD, relay_unwrap, relay_wrap
from ._messages import MessageDecoder, Request, encode, error, ok, parse_message, push
from ._spec import REGISTRY_PORT, RendezvousSpec
from ._store import (
    MAX_LOCAL_ENDPOINTS,
    NodeRecord,
    SqliteStore,
    Store,
    format_endpoint,
    parse_endpoint_text,
    validate_hostname,
    validate_tag,
    validate_tags,
)

__all__ = ["Rendezvous", "RendezvousStatistics"]

logger = logging.getLogger("overlay_httpx")

MAX_FOUND: Final = 100
"""Records in one find_by_tag answer (sorted by address); keeps it inside one message."""
_PUNCH_RATE: Final = 5.0  # punch pushes per second a node may cause (bursts of 10)
_PUNCH_BURST: Final = 10.0
_REBUILD_EVERY: Final = 1.0  # seconds between rebuilds of the endpoint map on unknown sources
_SESSION_OPS: Final = frozenset(
    {"heartbeat", "set_tags", "lookup", "resolve", "find_by_tag", "connect", "unregister"}
)


@dataclass(frozen=True, slots=True)
class RendezvousStatistics:
    registered: int
    """Nodes with a live registration."""
    connected: int
    """Nodes with an open control stream."""
    relayed_datagrams: int
    relayed_bytes: int
    relay_drops: dict[str, int]


class _Session:
    """One node's open control stream."""

    __slots__ = ("address", "bucket", "identity", "lock", "punches", "stream")

    def __init__(self, stream: OverlayStream, bucket: TokenBucket) -> None:
        self.punches = TokenBucket(_PUNCH_RATE, _PUNCH_BURST)  # punch pushes it may cause
        self.stream = stream
        self.address = stream.peer_address
        self.identity = stream.peer_identity
        self.lock = anyio.Lock()
        self.bucket = bucket

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.stream.extra(OverlayAttribute.peer_endpoint)


class Rendezvous:
    """A rendezvous server, in process (tests, embedding) or behind ``overlay-httpx rendezvous``.

    ::

        async with Rendezvous(identity, bind="0.0.0.0:9000", db="registry.db") as rv:
            print(rv.spec)  # what nodes pass as Node(..., rendezvous=...)
            await anyio.sleep_forever()
    """

    def __init__(
        self,
        identity: Identity | None = None,
        *,
        bind: str | tuple[str, int] = "127.0.0.1:0",
        db: str | os.PathLike[str] = ":memory:",
        store: Store | None = None,
        ttl: float = 90.0,
        network_key: bytes | str | None = None,
        relay_rate: float = 8_000_000.0,
        relay_burst: float = 1_000_000.0,
        max_nodes: int = 65_536,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._identity = identity or Identity.generate()
        self._node = Node(self._identity, bind=bind, network_key=network_key, max_tunnels=max_nodes)
        self._db = db
        self._store: Store | None = store
        self._ttl = ttl
        self._relay_rate = relay_rate
        self._relay_burst = relay_burst
        self._clock = clock
        self._sessions: dict[Address, _Session] = {}
        self._by_endpoint: dict[tuple[str, int], _Session] = {}
        self._relayed = 0
        self._relayed_bytes = 0
        self._relay_drops: Counter[str] = Counter()
        self._arrivals: dict[Address, anyio.Event] = {}
        self._rebuilt_at = -math.inf

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Rendezvous:
        if self._store is None:
            self._store = SqliteStore(self._db, ttl=self._ttl)
        self._ttl = self._store.ttl
        node = self._node
        await node.__aenter__()
        try:
            endpoint = node._endpoint
            assert endpoint is not None
            endpoint.answer_identify = True
            endpoint.relay_forwarder = self._forward
            listener = await node.listen(REGISTRY_PORT)
        except BaseException:
            await node.aclose()
            raise
        # Both loops live in the node's task group and end with it.
        node._spawn(listener.serve(self._serve_session))
        node._spawn(self._expire_loop())
        logger.info("rendezvous %s listening on UDP %s:%d", self.address, *self.endpoint)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._node.aclose()
        if self._store is not None:
            store, self._store = self._store, None
            store.close()

    # -- what nodes need to know --------------------------------------------------------------

    @property
    def node(self) -> Node:
        return self._node

    @property
    def address(self) -> Address:
        return self._node.address

    @property
    def public(self) -> PublicIdentity:
        return self._node.public

    @property
    def endpoint(self) -> tuple[str, int]:
        return self._node.endpoint

    @property
    def spec(self) -> str:
        """``IDENTITY@host:port``: the rendezvous argument that pins this server's key."""
        host, port = self.endpoint
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return str(RendezvousSpec(host, port, self.public))

    @property
    def store(self) -> Store:
        assert self._store is not None, "the rendezvous is not started"
        return self._store

    async def wait_for(self, address: Address | str) -> None:
        """Wait until the node at `address` is registered and connected."""
        addr = address if isinstance(address, Address) else Address.parse(address)
        while addr not in self._sessions:
            event = self._arrivals.setdefault(addr, anyio.Event())
            await event.wait()

    def statistics(self) -> RendezvousStatistics:
        return RendezvousStatistics(
            registered=len(self.store.all(self._clock())),
            connected=len(self._sessions),
            relayed_datagrams=self._relayed,
            relayed_bytes=self._relayed_bytes,
            relay_drops=dict(self._relay_drops),
        )

    # -- the registry protocol -----------------------------------------------------------------

    async def _serve_session(self, stream: OverlayStream) -> None:
        session = _Session(stream, TokenBucket(self._relay_rate, self._relay_burst))
        decoder = MessageDecoder()
        try:
            async with stream:
                while True:
                    data = await stream.receive()
                    try:
                        messages = [parse_message(obj) for obj in decoder.feed(data)]
                    except RegistryProtocolError as exc:
                        await self._send(session, error(0, exc.code, str(exc)))
                        return  # the framing is lost: this stream is over
                    for message in messages:
                        if isinstance(message, Request):
                            await self._send(session, self._answer(session, message))
        except (
            OverlayError,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            anyio.EndOfStream,
        ):
            pass
        except Exception:  # one session's bug must never end the registry for everyone
            logger.exception("rendezvous: the session of %s failed", session.address)
        finally:
            if self._sessions.get(session.address) is session:
                del self._sessions[session.address]
            self._by_endpoint = {}

    async def _send(self, session: _Session, message: dict[str, object]) -> None:
        try:
            data = encode(message)
        except ValueError as exc:  # an answer too large for one message, say
            ident = message.get("id", 0)
            data = encode(error(ident if isinstance(ident, int) else 0, "internal", str(exc)))
        async with session.lock:
            await session.stream.send(data)

    def _answer(self, session: _Session, req: Request) -> dict[str, object]:
        try:
            if req.op == "register":
                return ok(req.id, self._register(session, req))
            if req.op in _SESSION_OPS and self._sessions.get(session.address) is not session:
                raise NotRegistered(f"{session.address} must register before {req.op!r}")
            return ok(req.id, getattr(self, f"_op_{req.op}")(session, req))
        except RegistryError as exc:
            return error(req.id, exc.code, str(exc))
        except Exception:
            logger.exception("rendezvous: %r from %s failed", req.op, session.address)
            return error(req.id, "internal", f"the rendezvous failed to carry out {req.op!r}")

    def _register(self, session: _Session, req: Request) -> dict[str, object]:
        now = self._clock()
        store = self.store
        local = req.args.get("local_endpoints", [])
        if not isinstance(local, list) or len(local) > MAX_LOCAL_ENDPOINTS:
            raise RegistryProtocolError(
                f"'local_endpoints': expected a list of at most {MAX_LOCAL_ENDPOINTS} endpoints"
            )
        record = NodeRecord(
            address=session.address,
            identity=session.identity,
            endpoint=session.endpoint,
            local_endpoints=tuple(parse_endpoint_text(ep, field="local_endpoints") for ep in local),
            tags=validate_tags(req.args.get("tags", [])),
            hostname=validate_hostname(req.args.get("hostname")),
            last_seen=now,
        )
        try:
            store.claim(record.address, record.identity)
        except AddressTaken:
            if record.address != default_address(record.identity, record.address.network):
                raise
            # An address derived from a key belongs to that key, whoever claimed it first:
            # knowing someone's public key must not let anyone squat their address.
            logger.warning("rendezvous: %s reclaimed by the key it derives from", record.address)
            store.evict(record.address)
            squatter = self._sessions.pop(record.address, None)
            if squatter is not None and squatter is not session:
                squatter.stream.close()
            store.claim(record.address, record.identity)
        store.put(record)
        old = self._sessions.get(record.address)
        self._sessions[record.address] = session
        self._by_endpoint = {}
        arrival = self._arrivals.pop(record.address, None)
        if arrival is not None:
            arrival.set()
        if old is not None and old is not session:
            old.stream.close()
        logger.debug("rendezvous: %s registered from %s", record.address, record.endpoint)
        return {
            "address": str(record.address),
            "endpoint": format_endpoint(record.endpoint),
            "ttl": self._ttl,
        }

    def _current(self, session: _Session) -> NodeRecord:
        record = self.store.get(session.address, self._clock())
        if record is None:
            raise NotRegistered(f"the registration of {session.address} expired")
        return record

    def _refresh(self, session: _Session, **changes: object) -> NodeRecord:
        record = self._current(session)
        fields = {
            "address": record.address,
            "identity": record.identity,
            "endpoint": session.endpoint,
            "local_endpoints": record.local_endpoints,
            "tags": record.tags,
            "hostname": record.hostname,
            "last_seen": self._clock(),
        }
        fields.update(changes)
        fresh = NodeRecord(**fields)  # type: ignore[arg-type]
        self.store.put(fresh)
        return fresh

    def _op_heartbeat(self, session: _Session, req: Request) -> object:
        record = self._refresh(session)
        return {"endpoint": format_endpoint(record.endpoint)}

    def _op_set_tags(self, session: _Session, req: Request) -> object:
        record = self._refresh(session, tags=validate_tags(req.args.get("tags")))
        return {"tags": list(record.tags)}

    def _op_unregister(self, session: _Session, req: Request) -> object:
        self.store.remove(session.address)
        return None

    def _find(self, address_text: object) -> NodeRecord:
        if not isinstance(address_text, str):
            raise RegistryProtocolError("'address': expected an overlay address string")
        try:
            address = Address.parse(address_text)
        except ValueError as exc:
            raise RegistryProtocolError(f"'address': {exc}") from None
        record = self.store.get(address, self._clock())
        if record is None:
            raise NotRegistered(f"no live node has address {address}")
        return record

    def _op_lookup(self, session: _Session, req: Request) -> object:
        return self._find(req.args.get("address")).to_json()

    def _op_resolve(self, session: _Session, req: Request) -> object:
        name = validate_hostname(req.args.get("hostname"))
        record = None if name is None else self.store.by_hostname(name, self._clock())
        if record is None:
            raise NotRegistered(f"no live node has hostname {name!r}")
        return record.to_json()

    def _op_find_by_tag(self, session: _Session, req: Request) -> object:
        tag = validate_tag(req.args.get("tag"))
        records = self.store.by_tag(tag, self._clock())[:MAX_FOUND]  # one answer fits a frame
        return [r.to_json() for r in records]

    def _op_connect(self, session: _Session, req: Request) -> object:
        """The target's record for the caller; the caller's record pushed to the target."""
        target = self._find(req.args.get("address"))
        peer = self._sessions.get(target.address)
        if peer is not None and session.punches.take(1, time.monotonic(), debt=True):
            # Rate-limited: each push makes the target send datagrams to endpoints the
            # caller chose, which must not become a reflector.
            me = self._refresh(session)
            message = encode(push("punch", {"peer": me.to_json()}))
            self._node._spawn(self._push(peer, message))
        return target.to_json()

    async def _push(self, session: _Session, message: bytes) -> None:
        try:
            async with session.lock:
                await session.stream.send(message)
        except (OverlayError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    async def _expire_loop(self) -> None:
        while True:
            await anyio.sleep(max(self._ttl / 3, 0.05))
            expired = self.store.expire(self._clock())
            if expired:
                logger.debug("rendezvous: %d registrations expired", expired)

    # -- the relay -------------------------------------------------------------------------------

    def _session_at(self, addr: tuple[str, int], now: float) -> _Session | None:
        """The registered node sending from `addr`. The map is rebuilt when it was
        cleared (sessions changed) or, for an unknown source, at most once a second
        (a node may have moved), so junk cannot force a rebuild per datagram."""
        session = self._by_endpoint.get(addr)
        if session is None and (not self._by_endpoint or now - self._rebuilt_at >= _REBUILD_EVERY):
            self._rebuilt_at = now
            self._by_endpoint = {s.endpoint: s for s in self._sessions.values()}
            session = self._by_endpoint.get(addr)
        return session

    def _forward(
        self, data: bytes, addr: tuple[str, int], now: float
    ) -> tuple[bytes, tuple[str, int]] | None:
        source = self._session_at(addr, now)
        if source is None:
            self._relay_drops["unknown_source"] += 1
            return None
        unwrapped = relay_unwrap(data)
        if unwrapped is None:
            self._relay_drops["malformed"] += 1
            return None
        destination, inner = unwrapped
        target = self._sessions.get(destination)
        if target is None:
            self._relay_drops["unknown_destination"] += 1
            return None
        if not source.bucket.take(len(inner) + RELAY_OVERHEAD, now, debt=True):
            self._relay_drops["rate_limited"] += 1
            return None
        self._relayed += 1
        self._relayed_bytes += len(inner)
        return relay_wrap(source.address, inner), target.endpoint
