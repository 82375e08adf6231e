"""`Node`: the in-process tunnel manager on one real UDP socket.

One Node serves every client and server of a process. It owns the socket,
the sans-IO `Endpoint` (the table of tunnels, one per peer) and one timer
task, and turns the endpoint's events into wake-ups and errors for the
`OverlayStream`s and `OverlayListener`s built on it. Received datagrams are
fed to the endpoint synchronously from the socket's reader, and everything the
endpoint wants to send goes out in the same call (`_flush`), so no datagram
ever waits in a queue of ours.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from contextlib import AsyncExitStack, suppress
from types import TracebackType
from typing import TYPE_CHECKING, Final

import anyio

from .._address import Address
from .._exceptions import (
    LocalProtocolError,
    OverlayError,
    PortInUse,
    RendezvousUnavailable,
)
from .._identity import Identity, PublicIdentity, default_address
from .._protocol._config import MAX_DATAGRAM_SIZE, MIN_DATAGRAM_SIZE, TunnelConfig
from .._protocol._endpoint import Endpoint, TrustCallback
from .._protocol._tunnel import Tunnel
from ._discovery import PeerBook, PeerInfo, check_tags, make_client
from ._discovery import network_key as make_network_key
from ._idle import IdleWork
from ._router import Router
from ._stats import NodeStatistics
from ._stream import OverlayListener, OverlayStream, Path, Waiter, waiter_factory
from ._trust import TrustPolicy
from ._udp import DEFAULT_BUFFER_BYTES, Addr, UdpSocket, loop_clock, parse_endpoint

if TYPE_CHECKING:
    from .._rendezvous._client import RendezvousClient
    from .._rendezvous._store import NodeRecord

__all__ = ["Node", "NodeStatistics", "PeerInfo"]

logger = logging.getLogger("overlay_httpx")

_LOOPBACK_DATAGRAM_SIZE: Final = MAX_DATAGRAM_SIZE


def _as_address(value: Address | str) -> Address:
    if isinstance(value, Address):
        return value
    if isinstance(value, str):
        return Address.from_host(value) if value.endswith(".overlay") else Address.parse(value)
    raise LocalProtocolError(
        f"address {value!r}: expected an Address or text like '1:0001.0001.0001'"
    )


def _check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"overlay port {port!r}: expected an int in 0..65535")
    return port


class Node:
    """Every tunnel of this process, on one UDP socket.

    ::

        async with Node(identity) as node:
            node.add_peer(address, public_identity, "127.0.0.1:4001")
            stream = await node.connect(address, 80)

    The address defaults to one derived from the identity, so it survives
    restarts. `max_datagram_size` defaults to 1200 bytes (safe on every path),
    or the largest size when bound to loopback, where no path can be smaller.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        network: int = 1,
        address: Address | str | None = None,
        bind: str | tuple[str, int] = "127.0.0.1:0",
        keepalive: float | None = 30.0,
        idle_timeout: float = 120.0,
        handshake_timeout: float = 5.0,
        persistent_keepalive: bool = False,
        max_datagram_size: int | None = None,
        trust: TrustPolicy | TrustCallback | None = None,
        network_key: bytes | str | None = None,
        rendezvous: str | None = None,
        tags: Iterable[str] = (),
        hostname: str | None = None,
        advertise: Iterable[str | tuple[str, int]] | None = None,
        direct_timeout: float = 1.0,
        max_tunnels: int = 4096,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        linger: float = 2.0,
    ) -> None:
        if not isinstance(identity, Identity):
            raise LocalProtocolError(
                f"identity: expected an overlay_httpx.Identity, got {type(identity).__name__}"
                " (use Identity.generate() or Identity.load_or_create(path))"
            )
        self._identity = identity
        self._bind = parse_endpoint(bind, "bind")
        if address is None:
            self._address = default_address(identity.public, network)
        else:
            self._address = _as_address(address)
            if self._address.network != network and network != 1:
                raise LocalProtocolError(
                    f"address {self._address} is in network {self._address.network}, "
                    f"but network={network} was given"
                )
        if max_datagram_size is None:
            loopback = ipaddress.ip_address(self._bind[0]).is_loopback
            max_datagram_size = _LOOPBACK_DATAGRAM_SIZE if loopback else MIN_DATAGRAM_SIZE
        try:
            self._config = TunnelConfig(
                max_datagram_size=max_datagram_size,
                keepalive=keepalive,
                persistent_keepalive=persistent_keepalive,
                idle_timeout=idle_timeout,
                handshake_timeout=handshake_timeout,
                max_tunnels=max_tunnels,
            )
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None
        self._network_key = make_network_key(network_key)
        self._book = PeerBook(self, trust)
        self._peers = self._book.static
        self._rv: RendezvousClient | None = None
        if rendezvous is not None:
            self._rv = self._book.client = make_client(
                self, rendezvous, tags, hostname, direct_timeout
            )
            if advertise is not None:
                if isinstance(advertise, str):
                    advertise = [advertise]
                self._rv.advertise = [parse_endpoint(ep, "advertise") for ep in advertise]
        elif tags or hostname is not None or advertise is not None:
            raise LocalProtocolError(
                "tags, hostname and advertise go to a rendezvous: pass rendezvous='host:port' too"
            )
        self._buffer_bytes = buffer_bytes
        self._linger = linger
        self._router = Router(self)
        self._endpoint: Endpoint | None = None
        self._udp: UdpSocket | None = None
        self._stack: AsyncExitStack | None = None
        self._clock: Callable[[], float] = time.monotonic
        self._new_waiter: Callable[[], Waiter] = anyio.Event  # what streams wait on
        self._deadline = math.inf  # when the endpoint needs handle_timer
        self._armed = math.inf  # when the timer task will wake (never later than that)
        self._timer_scope: anyio.CancelScope | None = None
        self._in_flush = False
        self._flush_again = False
        self._drained: anyio.Event | None = None
        self._dropped_logged = 0
        self._losses_logged: dict[bytes, int] = {}
        self._state = "new"

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        if self._state != "new":
            raise LocalProtocolError(
                f"this Node is {self._state}; create a new Node to start again"
            )
        self._clock = loop_clock()
        self._new_waiter = waiter_factory()
        self._idle = IdleWork(self._clock, self._spawn)
        now = self._clock()
        self._endpoint = Endpoint(
            self._identity,
            self._address,
            config=self._config,
            trust=self._book.admit,
            timestamp_origin_ns=time.time_ns() - int(now * 1e9),
            network_key=self._network_key,
        )
        self._endpoint.keys.prepare()
        if self._rv is not None:
            self._endpoint.on_identify_answer = self._rv.on_identify_answer
        self._udp = UdpSocket(
            self._bind, self._on_datagram, self._flush, buffer_bytes=self._buffer_bytes
        )
        stack = AsyncExitStack()
        try:
            group = await stack.enter_async_context(anyio.create_task_group())
            group.start_soon(self._timer_loop)
            self._udp.start(group)
        except BaseException:
            self._udp.close()
            await stack.aclose()
            raise
        self._group = group
        self._stack = stack
        self._state = "running"
        logger.debug("node %s listening on UDP %s:%d", self._address, *self.endpoint)
        if self._rv is not None:
            group.start_soon(self._rv.run)
            with anyio.move_on_after(self._config.handshake_timeout + 1.0):
                await self._rv.first_attempt.wait()  # registered, or the first try failed
            if self._rv.refused is not None:
                refused = self._rv.refused
                await self.aclose()
                raise refused
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Deliver what streams still owe (up to `linger` seconds), tell peers, stop.

        Peers get a CLOSE, so their tunnels end at once rather than by idle
        timeout; streams still open fail with `TunnelClosed`.
        """
        if self._state != "running":
            return
        if self._rv is not None and self._rv.is_registered:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(0.5),
                suppress(OverlayError, anyio.BrokenResourceError, anyio.ClosedResourceError),
            ):
                await self._rv.call("unregister", wait=0.5)  # leave now, not by expiry
        self._state = "closing"
        assert self._endpoint is not None
        assert self._udp is not None
        assert self._stack is not None
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self._linger):
                while not self._all_delivered():
                    self._drained = anyio.Event()
                    await self._drained.wait()
            self._drained = None
            self._endpoint.close(self._clock(), reason="node closed")
            self._flush()
            self._router.close_all(f"node {self._address} closed")
            self._udp.close()
        self._group.cancel_scope.cancel()
        self._state = "closed"
        await self._stack.aclose()
        logger.debug("node %s closed", self._address)

    def _check_running(self) -> Endpoint:
        if self._state != "running" or self._endpoint is None:
            raise LocalProtocolError(
                f"Node {self._address} is {self._state}: use it inside 'async with Node(...)'"
            )
        return self._endpoint

    # -- identity and peers -----------------------------------------------------------------

    @property
    def address(self) -> Address:
        return self._address

    @property
    def public(self) -> PublicIdentity:
        return self._identity.public

    @property
    def identity(self) -> Identity:
        return self._identity

    @property
    def rendezvous(self) -> str | None:
        """The rendezvous this node registers with (``IDENTITY@host:port`` once known)."""
        if self._rv is None:
            return None
        return str(self._rv.spec)

    @property
    def endpoint(self) -> Addr:
        """The bound UDP (host, port)."""
        if self._udp is None:
            raise LocalProtocolError("the Node is not started: use 'async with Node(...)'")
        return self._udp.local_endpoint

    def add_peer(
        self,
        address: Address | str,
        identity: PublicIdentity | str,
        endpoint: str | tuple[str, int],
    ) -> None:
        """A peer reachable without a rendezvous: its address, public identity and UDP endpoint."""
        addr = _as_address(address)
        if isinstance(identity, str):
            identity = PublicIdentity.parse(identity)
        if not isinstance(identity, PublicIdentity):
            raise LocalProtocolError(
                f"identity {identity!r}: expected a PublicIdentity or its 'ovid1_...' text"
            )
        if identity == self.public:
            raise LocalProtocolError(f"{addr} is this node's own identity; it cannot be a peer")
        self._peers[addr] = PeerInfo(addr, identity, parse_endpoint(endpoint, "peer endpoint"))

    def remove_peer(self, address: Address | str) -> None:
        self._peers.pop(_as_address(address), None)

    def peers(self) -> list[PeerInfo]:
        return list(self._peers.values())

    # -- discovery (needs rendezvous=) ---------------------------------------------------------

    def _client(self) -> RendezvousClient:
        self._check_running()
        if self._rv is None:
            raise RendezvousUnavailable(
                f"node {self._address} has no rendezvous: create it with "
                f"Node(identity, rendezvous='host:port')",
                address=self._address,
            )
        return self._rv

    async def wait_path(self, address: Address | str, path: Path) -> None:
        """Wait until the tunnel to `address` runs over `path` ("direct" or "relayed")."""
        addr = _as_address(address)
        while True:
            self._check_running()
            changed = self._router.path_changed
            for stats in self.statistics().tunnels:
                if stats.peer_address == addr and stats.path == path and stats.state != "closed":
                    return
            await changed.wait()

    async def wait_registered(self) -> None:
        """Wait until the rendezvous has this node's current record."""
        client = self._client()
        while not client.is_registered:
            await client._connected.wait()

    async def set_tags(self, tags: Iterable[str]) -> None:
        """Replace this node's tags at the rendezvous (kept for re-registrations)."""
        client = self._client()
        checked = check_tags(tags)
        await client.call("set_tags", tags=list(checked))
        client.tags = checked

    async def find_by_tag(self, tag: str) -> list[NodeRecord]:
        """Live nodes that carry `tag`, as registered at the rendezvous."""
        records = await self._client().records("find_by_tag", tag=tag)
        for record in records:
            self._book.learn(record)
        return records

    async def resolve(self, hostname: str) -> NodeRecord:
        """The live node registered under `hostname` (raises `NotRegistered`)."""
        record = await self._client().record("resolve", hostname=hostname)
        self._book.learn(record)
        return record

    async def lookup(self, address: Address | str) -> NodeRecord:
        """The live record of `address` at the rendezvous (raises `NotRegistered`)."""
        record = await self._client().record("lookup", address=str(_as_address(address)))
        self._book.learn(record)
        return record

    # -- hooks for the rendezvous client -----------------------------------------------------

    def _set_rendezvous(self, address: Address, identity: PublicIdentity, endpoint: Addr) -> None:
        self._book.rendezvous = PeerInfo(address, identity, endpoint)
        if self._endpoint is not None:
            self._endpoint.relay = endpoint

    def _send_raw(self, data: bytes, addr: Addr) -> None:
        if self._udp is not None and self._state == "running":
            self._udp.sendto(data, addr)

    def _tunnel_for(self, identity: PublicIdentity) -> Tunnel | None:
        return self._endpoint.tunnel(identity) if self._endpoint is not None else None

    def _later(self, key: Hashable, work: Callable[[], object]) -> None:
        """Run `work` once the node is quiet (see `_idle`): work no request waits for."""
        if self._state == "running":
            self._idle.add(key, work)

    def _spawn(self, work: Awaitable[None]) -> None:
        """Run `work` in the node's task group; its failures are logged, never raised."""

        async def guarded() -> None:
            try:
                await work
            except Exception:
                logger.exception("node %s: background task failed", self._address)

        if self._state == "running":
            self._group.start_soon(guarded)
        elif hasattr(work, "close"):
            work.close()

    # -- streams -------------------------------------------------------------------------------

    async def connect(
        self, address: Address | str, port: int = 80, *, wait: bool = True
    ) -> OverlayStream:
        """A new stream to `port` on the node at `address`.

        The first stream to a peer makes the tunnel (one handshake round trip,
        shared by concurrent callers); later streams reuse it and cost no round
        trip. A refused port shows as `PortUnreachable` on the stream's first
        `receive` or `send` after the peer's answer, one round trip later.

        With ``wait=False`` the stream comes back as soon as the handshake is
        under way: what is sent on it waits in the tunnel and leaves the moment
        the keys exist, so a caller can make its first message during the round
        trip. `OverlayStream.wait_established` then reports how the handshake
        ended (a failed one also fails the stream, as `TunnelClosed`).
        """
        endpoint = self._check_running()
        addr = _as_address(address)
        port = _check_port(port)
        peer, record = await self._book.locate(addr, port)
        endpoint = self._check_running()
        key = peer.identity.x25519
        while True:
            tunnel = endpoint.tunnel(key)
            if tunnel is None or tunnel.is_closed:
                tunnel = endpoint.connect(peer.identity, peer.endpoint, self._clock())
                if record is not None and self._rv is not None:
                    tunnel.candidates[:] = self._rv.candidates(record)[1:]
                    tunnel.retry_handshake(self._clock())
                    self._rv.watch(tunnel, record)
                self._flush()
            if tunnel.is_established or not wait:
                break
            await self._router.wait_handshake(key, addr, port)
            self._check_running()
        stream_id = tunnel.open_stream(port, self._clock())
        stream = OverlayStream(
            self, tunnel, stream_id, port=port, peer_address=addr, peer_identity=peer.identity
        )
        self._router.add(stream)
        self._flush()
        return stream

    async def listen(self, port: int = 80, *, backlog: int = 1024) -> OverlayListener:
        """Accept streams that peers open to `port` (see `OverlayListener`)."""
        endpoint = self._check_running()
        port = _check_port(port)
        if port in self._router.listeners:
            raise PortInUse(
                f"overlay port {port} on {self._address} is already listened on",
                address=self._address,
                port=port,
            )
        listener = OverlayListener(self, port, backlog=backlog)
        self._router.listeners[port] = listener
        endpoint.listen(port)
        await anyio.lowlevel.checkpoint()
        return listener

    def _unlisten(self, port: int) -> None:
        self._router.listeners.pop(port, None)
        if self._endpoint is not None:
            self._endpoint.unlisten(port)

    def _forget_if_done(self, stream: OverlayStream) -> None:
        self._router.forget_if_done(stream)

    def _path_to(self, tunnel: Tunnel) -> Path:
        return "relayed" if tunnel.is_relayed else "direct"

    # -- the IO loop ---------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock()

    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        assert self._endpoint is not None
        self._endpoint.receive_datagram(data, addr, self._clock())

    def _flush(self) -> None:
        """Send what the endpoint has, act on its events, re-arm the timer."""
        endpoint, udp = self._endpoint, self._udp
        if endpoint is None or udp is None:
            return
        if self._in_flush:
            self._flush_again = True
            return
        self._in_flush = True
        try:
            while True:
                self._flush_again = False
                now = self._clock()
                for data, addr in endpoint.datagrams_to_send(now):
                    udp.sendto(data, addr)
                self._router.process(endpoint)
                if not self._flush_again:
                    break
            self._idle.last_activity = now
            if not endpoint.keys.spare:  # the next handshake's key, once nothing is going on
                self._later("ephemeral key", endpoint.keys.prepare)
            timer = endpoint.get_timer()
            self._set_deadline(math.inf if timer is None else timer)
            if self._drained is not None and self._all_delivered():
                self._drained.set()
            if logger.isEnabledFor(logging.DEBUG):
                self._log_activity(endpoint)
        finally:
            self._in_flush = False

    def _set_deadline(self, deadline: float) -> None:
        """Record when the endpoint next needs `handle_timer`.

        The timer is only moved earlier, never later: moving a loop timer
        costs more than waking once too early, which `_timer_loop` absorbs by
        sleeping again until the real deadline.
        """
        self._deadline = deadline
        if deadline < self._armed:
            self._armed = deadline
            if self._timer_scope is not None:
                self._timer_scope.deadline = deadline

    async def _timer_loop(self) -> None:
        while True:
            self._armed = self._deadline
            with anyio.CancelScope(deadline=self._armed) as scope:
                self._timer_scope = scope
                await anyio.sleep_forever()
            self._timer_scope = None
            endpoint = self._endpoint
            now = self._clock()
            if endpoint is not None and now >= self._deadline - 1e-6:
                # Loops may wake a hair early; the endpoint compares with `>=`.
                endpoint.handle_timer(max(now, self._deadline))
                self._flush()
            await anyio.lowlevel.checkpoint()

    def _all_delivered(self) -> bool:
        endpoint = self._endpoint
        return endpoint is None or not any(t.has_unacked_data for t in endpoint.tunnels())

    def _log_activity(self, endpoint: Endpoint) -> None:
        """Debug lines for drops and loss episodes (only computed when debug is on)."""
        dropped = endpoint.dropped
        if dropped != self._dropped_logged:
            self._dropped_logged = dropped
            logger.debug(
                "node %s: %d datagrams dropped so far: %s",
                self._address,
                dropped,
                endpoint.drops,
            )
        for tunnel in endpoint.tunnels():
            stats = tunnel.statistics()
            before = self._losses_logged.get(tunnel.peer, 0)
            if stats.packets_lost > before:
                self._losses_logged[tunnel.peer] = stats.packets_lost
                logger.debug(
                    "tunnel to %s: %d packets lost (%d in all), cwnd %d, rtt %s",
                    stats.peer_address,
                    stats.packets_lost - before,
                    stats.packets_lost,
                    stats.congestion_window,
                    f"{stats.smoothed_rtt * 1e3:.2f} ms" if stats.smoothed_rtt else "unknown",
                )

    # -- maintenance ----------------------------------------------------------------------------

    async def rebind(self, bind: str | tuple[str, int] | None = None) -> None:
        """Move to a new UDP socket (by default a new port on the same host).

        Peers see our packets come from a new endpoint and validate it, as
        after a NAT rebinding; streams carry on.
        """
        self._check_running()
        assert self._udp is not None
        target = parse_endpoint(bind, "bind") if bind is not None else (self._bind[0], 0)
        self._udp.rebind(target)
        if self._endpoint is not None:
            for tunnel in self._endpoint.tunnels():
                tunnel.ping()
        self._flush()
        await anyio.lowlevel.checkpoint()

    def statistics(self) -> NodeStatistics:
        endpoint = self._check_running()
        assert self._udp is not None
        stats = endpoint.statistics()
        return NodeStatistics(
            address=self._address,
            endpoint=self._udp.local_endpoint,
            receive_buffer=self._udp.receive_buffer,
            send_buffer=self._udp.send_buffer,
            max_datagram_size=self._config.max_datagram_size,
            tunnels=stats.tunnels,
            streams=len(self._router.streams),
            listeners=tuple(sorted(self._router.listeners)),
            datagrams_received=stats.datagrams_received,
            datagrams_sent=stats.datagrams_sent,
            drops=dict(stats.drops),
            send_errors=dict(self._udp.send_errors),
            rendezvous=None if self._rv is None else str(self._rv._spec),
            registered=self._rv is not None and self._rv.is_registered,
            observed_endpoint=None if self._rv is None else self._rv.observed,
            relayed_tunnels=sum(1 for t in stats.tunnels if t.path == "relayed"),
        )

    def __repr__(self) -> str:
        return f"<Node {self._address} {self._state}>"
