"""`OverlayTransport`: httpx requests to ``http://<host>.overlay/`` over overlay tunnels.

::

    async with httpx.AsyncClient(transport=OverlayTransport(node)) as client:
        r = await client.get("http://1-0001-0001-0001.overlay/health")

The URL's port is the overlay port (default 80). Every (peer, port) gets one
HTTP/2 connection over one overlay stream, shared by all concurrent
requests. Hosts are turned into addresses by a `Resolver`; the default one
(`NodeResolver`) reads the address form (``1-0001-0001-0001.overlay``) and,
through the node's rendezvous, names (``<hostname>.overlay``) and tags
(``<tag>.tag.overlay``, spread over the nodes that carry the tag; a node whose
tunnel cannot be made is skipped for the next one).
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import AbstractContextManager, aclosing, nullcontext
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import anyio
import httpx

from .._address import Address
from .._exceptions import LocalProtocolError
from .._identity import Identity
from .._node import Node, OverlayAttribute
from ._client import Abandoned, H2ClientConnection, Refused, prepare_connection
from ._errors import Phase, map_errors
from ._resolver import NodeResolver

__all__ = [
    "AddressResolver",
    "OverlayTransport",
    "Resolver",
    "default_identity_path",
]

IDENTITY_ENV = "OVERLAY_HTTPX_IDENTITY"
BIND_ENV = "OVERLAY_HTTPX_BIND"
RENDEZVOUS_ENV = "OVERLAY_HTTPX_RENDEZVOUS"
_MAX_CANDIDATES = 3  # nodes of one tag tried for a request before giving up
#: the largest request body sent while the tunnel's handshake is still under way
#: (one DATA frame, far within the peer's first windows and the stream's buffer)
_EARLY_BODY = 16384
#: new connections a request may move to when others give theirs up in the handshake
_MAX_MOVES = 8


class Resolver(Protocol):
    """Turns a URL host into the overlay addresses that may serve it, best first."""

    async def resolve(self, host: str) -> Sequence[Address]: ...


class AddressResolver:
    """Hosts of the address form ``1-0001-0001-0001.overlay`` (what `Address.host` gives)."""

    async def resolve(self, host: str) -> Sequence[Address]:
        return [Address.from_host(host)]


def default_identity_path() -> Path:
    """``$OVERLAY_HTTPX_IDENTITY``, else ``$XDG_CONFIG_HOME/overlay_httpx/identity``."""
    explicit = os.environ.get(IDENTITY_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "overlay_httpx" / "identity"


def _deadline(
    ready: Callable[[], bool], request: httpx.Request, phase: Phase
) -> AbstractContextManager[object]:
    """`anyio.fail_after` for `phase`, skipped when `ready()` says nothing will wait
    (a cancel scope and a loop timer per request are measurable on the hot path)."""
    if ready():
        return nullcontext()
    return anyio.fail_after(_timeout(request, phase))


def _timeout(request: httpx.Request, phase: Phase) -> float | None:
    timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
    return timeouts.get(phase)


class _Body(httpx.AsyncByteStream):
    """A response body read from its HTTP/2 stream as the caller iterates."""

    def __init__(
        self,
        transport: OverlayTransport,
        conn: H2ClientConnection,
        sid: int,
        request: httpx.Request,
    ) -> None:
        self._conn = conn
        self._sid = sid
        self._request = request
        self._what = f"{conn.peer} {conn.authority}"
        self._transport = transport
        self._read_timeout = _timeout(request, "read")
        self._closed = False

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        # A class, not an async generator: a caller that stops early leaves
        # nothing behind for the garbage collector to finalise.
        conn, sid = self._conn, self._sid
        with map_errors("read", self._request, self._what):
            if conn.has_data(sid):  # a small body is all there: no timer to set and cancel
                data = await conn.receive_data(sid)
            else:
                with anyio.fail_after(self._read_timeout):
                    data = await conn.receive_data(sid)
        if data is None:
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._conn.finish(self._sid)
            await self._transport._release(self._conn)


class OverlayTransport(httpx.AsyncBaseTransport):
    """An httpx transport that routes ``.overlay`` URLs through a `Node`.

    With ``node=None`` the transport makes and owns a node when entered
    (``async with httpx.AsyncClient(transport=...)``): its identity comes
    from ``$OVERLAY_HTTPX_IDENTITY`` or a per-user path (created on first use,
    mode 0600), its socket binds ``$OVERLAY_HTTPX_BIND`` or ``0.0.0.0:0``.
    `aclose` closes what the transport owns and nothing it does not.
    Requests to other hosts go to `fallback` if given, else fail with
    `httpx.ConnectError`. A pooled HTTP/2 connection idle for
    `keepalive_expiry` seconds (as in `httpx.Limits`) is replaced by a fresh
    one, which costs no round trip over an existing tunnel; it stays below
    `serve()`'s `idle_timeout` so that requests do not race its GOAWAY.
    """

    def __init__(
        self,
        node: Node | None = None,
        *,
        resolver: Resolver | None = None,
        fallback: httpx.AsyncBaseTransport | None = None,
        identity: Identity | str | os.PathLike[str] | None = None,
        retries: int = 1,
        keepalive_expiry: float | None = 30.0,
    ) -> None:
        if node is not None and not isinstance(node, Node):
            raise LocalProtocolError(f"node: expected an overlay_httpx.Node, got {node!r}")
        self._node = node
        self._owned: Node | None = None
        self._identity = identity
        self._resolver: Resolver | None = resolver
        self._fallback = fallback
        self._retries = retries
        if keepalive_expiry is not None and not keepalive_expiry >= 0:
            raise LocalProtocolError(
                f"keepalive_expiry={keepalive_expiry!r}: expected seconds >= 0, or None"
            )
        self._keepalive_expiry = keepalive_expiry
        self._connections: dict[tuple[Address, int], H2ClientConnection] = {}
        self._connecting: dict[tuple[Address, int], anyio.Lock] = {}
        prepare_connection()  # the first connection's h2 state, before any request waits

    @property
    def node(self) -> Node:
        node = self._node or self._owned
        if node is None:
            raise LocalProtocolError(
                "OverlayTransport() without a node starts one when entered: use "
                "'async with httpx.AsyncClient(transport=OverlayTransport()) as client'"
            )
        return node

    async def __aenter__(self) -> OverlayTransport:
        if self._node is None and self._owned is None:
            identity = self._identity
            if not isinstance(identity, Identity):
                identity = Identity.load_or_create(identity or default_identity_path())
            node = Node(
                identity,
                bind=os.environ.get(BIND_ENV, "0.0.0.0:0"),
                rendezvous=os.environ.get(RENDEZVOUS_ENV) or None,
            )
            await node.__aenter__()
            self._owned = node
        if self._fallback is not None:
            await self._fallback.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        connections = list(self._connections.values())
        self._connections.clear()
        for conn in connections:
            await conn.aclose()
        if self._fallback is not None:
            await self._fallback.aclose()
        if self._owned is not None:
            owned, self._owned = self._owned, None
            await owned.aclose()

    # -- requests ------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if not host.endswith(".overlay"):
            if self._fallback is not None:
                return await self._fallback.handle_async_request(request)
            raise httpx.ConnectError(
                f"{host!r} is not an overlay host: expected e.g. 1-0001-0001-0001.overlay "
                "(or give OverlayTransport a fallback transport)",
                request=request,
            )
        if request.url.scheme != "http":
            raise httpx.UnsupportedProtocol(
                f"overlay URLs use http:// (the tunnel already encrypts), got {request.url.scheme}://",
                request=request,
            )
        port = request.url.port or 80
        if self._resolver is None:
            self._resolver = NodeResolver(self.node)
        with map_errors("connect", request, host):
            addresses = await self._resolver.resolve(host)
        if not addresses:
            raise httpx.ConnectError(f"no live overlay node serves {host}", request=request)
        replayable = isinstance(request.stream, httpx.ByteStream)
        attempts = 1 + (self._retries if replayable else 0)
        attempt = moved = 0
        while True:
            conn: H2ClientConnection | None = None
            try:
                conn = await self._first_connection(request, addresses, attempt, port)
                response = await self._exchange(request, conn)
            except Abandoned as exc:
                # Another request gave the new connection up during its handshake;
                # this one never left and its body was never read: it moves to a
                # fresh connection, which is no retry (the server saw nothing). (The
                # one that gave it up took it out of the pool.)
                moved += 1
                if moved > _MAX_MOVES:
                    raise httpx.ConnectError(str(exc), request=request) from exc
            except Refused as exc:
                assert conn is not None  # `_first_connection` raises only `Abandoned` of these
                await self._retire(conn)
                attempt += 1
                if attempt >= attempts:
                    raise httpx.RemoteProtocolError(str(exc), request=request) from exc
            else:
                # How many times the request went out: > 1 only for requests the
                # server refused before beginning them (GOAWAY, REFUSED_STREAM).
                response.extensions["overlay"]["attempts"] = attempt + 1
                return response

    async def _first_connection(
        self, request: httpx.Request, addresses: Sequence[Address], start: int, port: int
    ) -> H2ClientConnection:
        """A connection to the first of `addresses` (from `start` on) whose tunnel works."""
        tries = min(len(addresses), _MAX_CANDIDATES)
        for i in range(tries):
            address = addresses[(start + i) % len(addresses)]
            try:
                conn = await self._connection(request, address, port)
                if tries > 1:  # a failed handshake moves on to the next candidate: wait here
                    await self._established(request, conn)
                return conn
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if isinstance(self._resolver, NodeResolver):
                    self._resolver.failed(address)
                if i + 1 >= tries:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connection(
        self, request: httpx.Request, address: Address, port: int
    ) -> H2ClientConnection:
        key = (address, port)
        conn = self._connections.get(key)
        if conn is not None and conn.usable:
            return conn
        lock = self._connecting.setdefault(key, anyio.Lock())
        what = f"{address} port {port}"
        try:
            lock.acquire_nowait()  # nobody else connecting: no timer, no event-loop pass
        except anyio.WouldBlock:
            with map_errors("pool", request, what), anyio.fail_after(_timeout(request, "pool")):
                await lock.acquire()
        try:
            conn = self._connections.get(key)
            if conn is not None and conn.usable:
                return conn
            node = self.node
            with (
                map_errors("connect", request, what),
                anyio.fail_after(_timeout(request, "connect")),
            ):
                # The handshake goes on while the request is made (see `_exchange`).
                stream = await node.connect(address, port, wait=False)
                conn = H2ClientConnection(
                    stream,
                    authority=request.url.netloc.decode("ascii"),
                    keepalive_expiry=self._keepalive_expiry,
                )
                node._later("HTTP/2 client state", prepare_connection)  # for the next one
            old = self._connections.get(key)
            self._connections[key] = conn
            if old is not None and old.idle:
                await old.aclose()
            return conn
        finally:
            lock.release()

    async def _retire(self, conn: H2ClientConnection) -> None:
        """Take a connection that can start no more requests out of the pool, and close
        it once its last response is done (`_release` closes it then otherwise)."""
        key = (conn.peer, conn.overlay_stream.port)
        if self._connections.get(key) is conn:
            del self._connections[key]
        if conn.idle:
            await conn.aclose()

    async def _release(self, conn: H2ClientConnection) -> None:
        """A response finished; a connection that is going away closes once idle."""
        if not conn.usable:
            await self._retire(conn)

    async def _established(self, request: httpx.Request, conn: H2ClientConnection) -> None:
        """Wait for the handshake of a new connection's tunnel, within the connect timeout."""
        stream = conn.overlay_stream
        if stream.established:
            return
        try:
            with (
                map_errors("connect", request, f"{conn.peer} port {stream.port}"),
                anyio.fail_after(_timeout(request, "connect")),
            ):
                await stream.wait_established()
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            abandoned = conn.abandoned
            if abandoned is not None and isinstance(exc.__cause__, anyio.ClosedResourceError):
                # Another request's failure gave the connection up while its handshake
                # went on: this one was never sent, and may go on a fresh connection.
                raise abandoned from None
            if stream.established:
                return  # the keys came as the deadline passed: the request has left
            if isinstance(self._resolver, NodeResolver):
                self._resolver.failed(conn.peer)
            raise

    async def _exchange(self, request: httpx.Request, conn: H2ClientConnection) -> httpx.Response:
        what = f"{conn.peer} port {conn.overlay_stream.port}"
        target = request.url.raw_path
        body = request.stream
        declared = request.headers.get("content-length")
        # A body known in full, read once here (a ByteStream holds one bytes object).
        content = b"".join(body) if isinstance(body, httpx.ByteStream) else None
        # A server's h2 ends the whole connection over a wrong length, taking the other
        # requests on it along: say so here, before anything leaves.
        if (
            content is not None
            and declared is not None
            and (not declared.isdigit() or int(declared) != len(content))
        ):
            raise httpx.LocalProtocolError(
                f"the request's content-length is {declared!r} but its body is "
                f"{len(content)} bytes",
                request=request,
            )
        has_body = content is None or declared not in (None, "0")
        # On a tunnel still in its handshake, the request is made during the round
        # trip and leaves with the keys. A body that might have to wait for flow
        # control waits for the handshake first: its failure is a connect error.
        early = not conn.overlay_stream.established
        # A body known in full (or none) may leave with the head, on an established
        # tunnel (during the handshake, whether a body may go early is decided below).
        whole = None
        if not early and content is not None:
            whole = content if has_body else b""
            if has_body and not whole:
                whole = None  # headers that announce a body and none: framed as before
        try:
            with map_errors("pool", request, what), _deadline(conn.can_open, request, "pool"):
                sid = await conn.open(
                    request.method.encode(),
                    target,
                    request.headers.raw,
                    has_body=has_body,
                    body=whole,
                )
        except Refused:
            if early:  # the connection failed before it began: a failed handshake says why
                await self._established(request, conn)
            raise
        try:
            if early and has_body and not _fits_early(content, conn, sid):
                await self._established(request, conn)
            if has_body:
                with map_errors("write", request, what):
                    if content is not None:
                        # Known in full: END_STREAM rides on its last DATA frame.
                        await conn.send_body(sid, content, _timeout(request, "write"))
                    else:
                        async with aclosing(_chunks(request)) as chunks:
                            await conn.send_body(sid, chunks, _timeout(request, "write"))
            if early:
                await self._established(request, conn)
            with map_errors("read", request, what), anyio.fail_after(_timeout(request, "read")):
                head = await conn.receive_head(sid)
        except BaseException:
            with anyio.CancelScope(shield=True):
                if early:
                    # Given up (a timeout, a cancel) while the handshake goes on: nothing
                    # has left yet, and nothing may leave later (a connect error means
                    # "not sent").
                    conn.abandon("the connection was given up during its handshake")
                await conn.finish(sid)
                await self._release(conn)
            raise
        stream = conn.overlay_stream
        extensions: dict[str, Any] = {
            "http_version": b"HTTP/2",
            "stream_id": sid,
            "overlay": {
                "peer_address": conn.peer,
                "peer_identity": conn.peer_identity,
                "fingerprint": conn.fingerprint,
                "path": stream.extra(OverlayAttribute.path),
                "rtt": stream.extra(OverlayAttribute.rtt),
            },
        }
        return httpx.Response(
            head.status,
            headers=head.headers,
            stream=_Body(self, conn, sid, request),
            extensions=extensions,
        )


def _fits_early(content: bytes | None, conn: H2ClientConnection, sid: int) -> bool:
    """A request body to send before the handshake ends: known in full, small, and
    within the flow-control windows left now (requests share the connection's),
    so sending it cannot wait."""
    if content is None:
        return False
    return len(content) <= _EARLY_BODY and conn.can_send_now(sid, len(content))


async def _chunks(request: httpx.Request) -> AsyncGenerator[bytes, None]:
    """The request body as an async iterator of non-empty chunks.

    httpx's bodies iterate through async generators; each is closed here
    explicitly, so abandoning an upload (a write timeout, a server that
    answered early) leaves no generator for the garbage collector to finish.
    """
    body = request.stream
    if isinstance(body, httpx.ByteStream):
        for chunk in body:  # the synchronous side of a bytes body: no generator to close
            yield chunk
        return
    assert isinstance(body, httpx.AsyncByteStream), "OverlayTransport needs an async body"
    iterator = body.__aiter__()
    try:
        async for chunk in iterator:
            if chunk:
                yield chunk
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()
