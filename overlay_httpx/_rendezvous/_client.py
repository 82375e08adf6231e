"""The node's side of the rendezvous: registration, queries, hole punching and the relay.

One `RendezvousClient` lives inside a `Node` that was given ``rendezvous=``.
It keeps one control stream open to the rendezvous's registry port over an
ordinary tunnel (so the registration is authenticated by the handshake),
registers, heartbeats, re-registers after the rendezvous restarts, answers
the rendezvous's *punch* pushes, and runs the path agent of each tunnel it
helped to open: direct first, the relay after `direct_timeout`, and back to a
direct path in the background when one starts to work.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Final

import anyio

from .._address import Address
from .._exceptions import (
    AddressTaken,
    FrameError,
    HostnameTaken,
    NotRegistered,
    OverlayError,
    RegistryError,
    RegistryProtocolError,
    RendezvousUnavailable,
    StoreError,
    TunnelError,
)
from .._identity import PublicIdentity
from .._protocol._packet import (
    IdentifyAnswer,
    identify_request,
    punch_datagram,
    relay_addr,
)
from .._protocol._sessions import bound_identity
from ._messages import MessageDecoder, Push, Request, Response, encode, parse_message, request
from ._spec import REGISTRY_PORT, RendezvousSpec
from ._store import NodeRecord, format_endpoint, parse_endpoint_text

if TYPE_CHECKING:
    from .._node._node import Node
    from .._node._stream import OverlayStream
    from .._protocol._tunnel import Tunnel

__all__ = ["RendezvousClient"]

logger = logging.getLogger("overlay_httpx")

_ERRORS: Final[dict[str, type[RegistryError]]] = {
    cls.code: cls
    for cls in (AddressTaken, HostnameTaken, NotRegistered, RegistryProtocolError, StoreError)
}
_CALL_TIMEOUT: Final = 5.0
_RECONNECT_WAIT: Final = 1.0
_BACKOFF_MAX: Final = 5.0
_UPGRADE_FIRST: Final = 1.0
_UPGRADE_MAX: Final = 30.0
_PUNCHES: Final = (0.0, 0.1, 0.3, 0.6)


_TRANSIENT: Final = (
    OverlayError,
    OSError,
    TimeoutError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from task groups."""
    while True:
        inner = getattr(exc, "exceptions", None)
        if not inner:
            return exc
        exc = inner[0]


def _error_for(code: str, message: str) -> RegistryError:
    return _ERRORS.get(code, RegistryError)(message, code=code)


class RendezvousClient:
    """Registration with, and requests to, one rendezvous server."""

    def __init__(
        self,
        node: Node,
        spec: RendezvousSpec,
        *,
        tags: Sequence[str],
        hostname: str | None,
        direct_timeout: float,
    ) -> None:
        self._node = node
        self._spec = spec
        self.tags = tuple(tags)
        self.hostname = hostname
        self.direct_timeout = direct_timeout
        self.identity: PublicIdentity | None = spec.identity
        self.address: Address | None = None
        self.endpoint: tuple[str, int] | None = None
        self.observed: tuple[str, int] | None = None
        self.ttl = math.inf
        self._stream: OverlayStream | None = None
        self._connected = anyio.Event()
        self.first_attempt = anyio.Event()
        self._send_lock = anyio.Lock()
        self._next_id = 0
        self._pending: dict[int, tuple[anyio.Event, list[Response]]] = {}
        self._identify: dict[bytes, tuple[anyio.Event, list[IdentifyAnswer]]] = {}
        self._agents: set[bytes] = set()  # tunnels (peer keys) a path agent looks after
        self.registrations = 0
        self.last_error = ""
        self.refused: RegistryError | None = None
        """Why the rendezvous refused our registration (address or hostname taken), if it did."""
        self.advertise: list[tuple[str, int]] | None = None
        """Local endpoints to publish instead of the detected ones (e.g. a port forward)."""

    @property
    def spec(self) -> RendezvousSpec:
        """The configured spec, with the rendezvous's key once it is known."""
        return dataclasses.replace(self._spec, identity=self.identity)

    @property
    def is_registered(self) -> bool:
        return self._stream is not None and self.observed is not None

    # -- the connection to the rendezvous ----------------------------------------------

    async def run(self) -> None:
        """Stay registered for the node's lifetime, reconnecting with backoff."""
        backoff = 0.1
        while True:
            registrations = self.registrations
            try:
                await self._session()
            except Exception as group:
                exc = _leaf(group)
                if isinstance(exc, (AddressTaken, HostnameTaken)):
                    self.refused = exc
                    logger.error("rendezvous %s refused our registration: %s", self._spec, exc)
                else:  # unreachable, restarted, or misbehaving: keep trying, never crash the node
                    self.last_error = str(exc) or type(exc).__name__
                    log = logger.info if isinstance(exc, _TRANSIENT) else logger.warning
                    log("rendezvous %s: %s; retrying in %.1f s", self._spec, exc, backoff)
            finally:
                self._disconnected()
                self.first_attempt.set()
            if self.registrations > registrations:
                backoff = 0.1  # that session worked: come back quickly
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _disconnected(self) -> None:
        self._stream = None
        self.observed = None
        self._connected = anyio.Event()
        for event, _ in self._pending.values():
            event.set()  # an empty answer list reads as "connection lost"

    async def _session(self) -> None:
        endpoint = await self._resolve_endpoint()
        if self.identity is None:
            self.identity = await self._ask_identity(endpoint)
            logger.info("rendezvous %s:%d is %s (learned on first use)", *endpoint, self.identity)
        node = self._node
        if self.address is None:
            self.address = await self._ask_address(endpoint)
        node._set_rendezvous(self.address, self.identity, endpoint)
        self.endpoint = endpoint
        stream = await node.connect(self.address, REGISTRY_PORT)
        async with stream, anyio.create_task_group() as group:
            self._stream = stream
            group.start_soon(self._read, stream)
            await self._register()
            self.refused = None
            self._connected.set()
            self.first_attempt.set()
            while True:
                await anyio.sleep(self.ttl / 3)
                try:
                    await self.call("heartbeat", wait=_CALL_TIMEOUT)
                except NotRegistered:
                    await self._register()

    async def _register(self) -> None:
        result = await self.call(
            "register",
            tags=list(self.tags),
            hostname=self.hostname,
            local_endpoints=[format_endpoint(ep) for ep in self._local_endpoints()],
            wait=_CALL_TIMEOUT,
        )
        if not isinstance(result, dict):
            raise RegistryProtocolError("register: expected an object in the answer")
        observed = result.get("endpoint")
        ttl = result.get("ttl")
        if not isinstance(observed, str) or not isinstance(ttl, (int, float)) or ttl <= 0:
            raise RegistryProtocolError("register: answer lacks 'endpoint' or 'ttl'")
        self.observed = parse_endpoint_text(observed, field="endpoint")
        self.ttl = float(ttl)
        self.registrations += 1
        logger.debug("registered with rendezvous %s as seen from %s", self._spec, observed)

    async def _resolve_endpoint(self) -> tuple[str, int]:
        host, port = self._spec.host, self._spec.port
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family = socket.AF_INET6 if ":" in self._node.endpoint[0] else socket.AF_INET
        for fam, *_, sockaddr in infos:
            if fam == family:
                return str(sockaddr[0]), int(sockaddr[1])
        raise RendezvousUnavailable(f"rendezvous host {host!r} has no address of our family")

    async def _ask(self, endpoint: tuple[str, int]) -> IdentifyAnswer:
        """The rendezvous's identity answer, asking a few times (UDP may lose one)."""
        nonce = os.urandom(8)
        event: anyio.Event = anyio.Event()
        box: list[IdentifyAnswer] = []
        self._identify[nonce] = (event, box)
        try:
            with anyio.fail_after(_CALL_TIMEOUT):
                delay = 0.1
                while not box:
                    self._node._send_raw(identify_request(nonce), endpoint)
                    with anyio.move_on_after(delay):
                        await event.wait()
                    delay = min(delay * 2, 1.0)
        except TimeoutError:
            raise RendezvousUnavailable(
                f"no answer from {endpoint[0]}:{endpoint[1]} within {_CALL_TIMEOUT:g} s"
            ) from None
        finally:
            del self._identify[nonce]
        return box[0]

    async def _ask_identity(self, endpoint: tuple[str, int]) -> PublicIdentity:
        answer = await self._ask(endpoint)
        try:
            identity = bound_identity(answer.x25519, answer.ed25519, answer.binding)
        except FrameError as exc:
            raise RegistryProtocolError(f"the rendezvous's identity answer: {exc}") from None
        self.address = answer.address
        return identity

    async def _ask_address(self, endpoint: tuple[str, int]) -> Address:
        answer = await self._ask(endpoint)
        assert self.identity is not None
        if answer.x25519 != self.identity.x25519:
            raise RendezvousUnavailable(
                f"the server at {endpoint[0]}:{endpoint[1]} is not the pinned rendezvous "
                f"{self.identity.fingerprint}"
            )
        return answer.address

    def on_identify_answer(self, answer: IdentifyAnswer) -> None:
        waiting = self._identify.get(answer.nonce)
        if waiting is not None:
            waiting[1].append(answer)
            waiting[0].set()

    def _local_endpoints(self) -> list[tuple[str, int]]:
        if self.advertise is not None:
            return list(self.advertise)
        host, port = self._node.endpoint
        if host not in ("0.0.0.0", "::"):
            return [(host, port)]
        assert self.endpoint is not None
        family = socket.AF_INET6 if host == "::" else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect(self.endpoint)  # no packet is sent; it picks the route
                return [(str(probe.getsockname()[0]), port)]
        except OSError:
            return []

    # -- requests ---------------------------------------------------------------------------

    async def call(self, op: str, *, wait: float = _CALL_TIMEOUT, **args: object) -> object:
        """One registry request; raises the registry's error or `RendezvousUnavailable`."""
        timeout = wait  # for the answer; the connection is waited for less after a failure
        if self.first_attempt.is_set():
            wait = min(wait, _RECONNECT_WAIT)
        if op != "register":  # everything else waits until the registration is answered
            with anyio.move_on_after(wait):
                while not self.is_registered:
                    await self._connected.wait()
        stream = self._stream if (op == "register" or self.is_registered) else None
        if stream is None:
            raise RendezvousUnavailable(
                f"rendezvous {self._spec} is not reachable ({self.last_error or 'no answer'})"
            )
        self._next_id += 1
        ident = self._next_id
        event = anyio.Event()
        box: list[Response] = []
        self._pending[ident] = (event, box)
        try:
            async with self._send_lock:
                await stream.send(encode(request(ident, op, **args)))
            with anyio.fail_after(timeout):
                await event.wait()
        except TimeoutError:
            # A session that stops answering is treated as dead now, not at the next
            # heartbeat: closing the stream makes `run` reconnect and re-register.
            if self._stream is stream:
                stream.reset()
            raise RendezvousUnavailable(
                f"rendezvous {self._spec} did not answer {op!r} within {timeout:g} s"
            ) from None
        finally:
            del self._pending[ident]
        if not box:
            raise RendezvousUnavailable(f"lost the connection to rendezvous {self._spec}")
        response = box[0]
        if response.error is not None:
            raise _error_for(*response.error)
        return response.result

    async def _read(self, stream: OverlayStream) -> None:
        decoder = MessageDecoder()
        while True:
            data = await stream.receive()
            for obj in decoder.feed(data):
                message = parse_message(obj)
                if isinstance(message, Response):
                    waiting = self._pending.get(message.id)
                    if waiting is not None:
                        waiting[1].append(message)
                        waiting[0].set()
                elif isinstance(message, Push):
                    self._on_push(message)
                elif isinstance(message, Request):
                    raise RegistryProtocolError("the rendezvous sent us a request")

    async def record(self, op: str, **args: Any) -> NodeRecord:
        return NodeRecord.from_json(await self.call(op, **args))

    async def records(self, op: str, **args: Any) -> list[NodeRecord]:
        result = await self.call(op, **args)
        if not isinstance(result, list):
            raise RegistryProtocolError(f"{op}: expected a list of records")
        return [NodeRecord.from_json(item) for item in result]

    # -- paths -------------------------------------------------------------------------------

    def candidates(self, record: NodeRecord) -> list[tuple[str, int]]:
        """Direct endpoints worth trying for `record`, best first."""
        out = [record.endpoint]
        for ep in record.local_endpoints[:4]:
            if ep not in out:
                out.append(ep)
        return out

    def _on_push(self, message: Push) -> None:
        if message.name != "punch":
            return
        try:
            record = NodeRecord.from_json(message.data.get("peer"))
        except RegistryError as exc:
            logger.debug("ignored a malformed punch from the rendezvous: %s", exc)
            return
        self._node._book.learn(record)
        tunnel = self._node._tunnel_for(record.identity)
        if tunnel is not None and tunnel.is_established:
            if tunnel.is_relayed:
                self._probe(tunnel, record)
            return
        self._node._spawn(self._punch(record))

    async def _punch(self, record: NodeRecord) -> None:
        """Open our NAT towards a peer that is about to initiate to us."""
        last = 0.0
        for at in _PUNCHES:
            await anyio.sleep(at - last)
            last = at
            for addr in self.candidates(record):
                self._node._send_raw(punch_datagram(), addr)

    def _probe(self, tunnel: Tunnel, record: NodeRecord) -> None:
        for addr in self.candidates(record):
            tunnel.probe_path(addr)
        self._node._flush()

    def watch(self, tunnel: Tunnel, record: NodeRecord) -> None:
        """Run the path agent for a tunnel we are initiating to a discovered peer."""
        if tunnel.peer in self._agents:
            return
        self._agents.add(tunnel.peer)
        self._node._spawn(self._agent(tunnel, record))

    async def _agent(self, tunnel: Tunnel, record: NodeRecord) -> None:
        try:
            if not tunnel.is_established:
                with anyio.move_on_after(self.direct_timeout):
                    try:
                        await self._node._router.wait_handshake(tunnel.peer, record.address, 0)
                    except TunnelError:
                        return  # refused or closed: the connect call reports it
            if tunnel.is_closed:
                return
            if not tunnel.is_established:
                logger.debug("no direct path to %s yet: trying the relay too", record.address)
                tunnel.candidates.append(relay_addr(record.address))
                tunnel.retry_handshake(self._node._now())
                self._node._flush()
            interval = _UPGRADE_FIRST
            while not tunnel.is_closed:
                await anyio.sleep(interval)
                if tunnel.is_established and not tunnel.is_relayed:
                    return
                if tunnel.is_established:
                    with suppress(RegistryError, RendezvousUnavailable):
                        # the rendezvous tells the peer to probe us too
                        await self.call("connect", address=str(record.address))
                    self._probe(tunnel, record)
                    await anyio.sleep(0.2)  # once more, after the peer's probes opened its NAT
                    self._probe(tunnel, record)
                interval = min(interval * 2, _UPGRADE_MAX)
        finally:
            self._agents.discard(tunnel.peer)
