"""Overlay streams and listeners as anyio's `ByteStream` and `Listener`.

Third-party code that takes an anyio byte stream (an h2 connection, a TLS
wrapper, `anyio.streams.buffered`) can take an `OverlayStream` unchanged. The
bytes live in the sans-IO tunnel until read, so a slow reader holds its peer
back by flow control rather than by filling a buffer of ours; these classes
only wait for the tunnel's events and translate its errors.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import anyio
from anyio.abc import ByteStream, Listener, TaskGroup

from .._address import Address
from .._exceptions import TunnelClosed, TunnelError
from .._identity import PublicIdentity
from .._protocol._config import whole_number
from .._protocol._events import ERROR_APPLICATION, ERROR_NO_ERROR
from .._protocol._frames import MAX_VARINT
from ._udp import current_backend

if TYPE_CHECKING:
    from .._protocol._tunnel import Tunnel
    from ._node import Node

__all__ = [
    "FutureWaiter",
    "OverlayAttribute",
    "OverlayListener",
    "OverlayStream",
    "Path",
    "Waiter",
    "waiter_factory",
]

Path = Literal["direct", "relayed"]

DEFAULT_RECEIVE_SIZE: Final = 65536
DEFAULT_BACKLOG: Final = 1024


class Waiter(Protocol):
    """A one-shot wake-up for one waiting task (the part of `anyio.Event` streams use)."""

    def set(self) -> None: ...
    def wait(self) -> Awaitable[None]: ...


class FutureWaiter:
    """`Waiter` on asyncio: one bare future.

    Readers wait once per message, and making, awaiting and setting an
    `anyio.Event` costs about five times more (it wraps an `asyncio.Event`,
    which makes its own future for each wait). Cancelling the waiting task
    (a cancel scope, a timeout) cancels the future; `set` on it afterwards
    does nothing, so a waiter abandoned that way is harmless.
    """

    __slots__ = ("_future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        if not self._future.done():  # set before, or cancelled with its waiter
            self._future.set_result(None)

    def wait(self) -> asyncio.Future[None]:
        return self._future


def waiter_factory() -> Callable[[], Waiter]:
    """What makes waiters for the running event loop: `FutureWaiter` on asyncio,
    `anyio.Event` elsewhere (trio)."""
    if current_backend() == "asyncio":
        return partial(FutureWaiter, asyncio.get_running_loop())
    return anyio.Event


class OverlayAttribute(anyio.TypedAttributeSet):
    """Typed attributes of overlay streams and listeners (``stream.extra(...)``)."""

    #: the node's own overlay address
    local_address: Address = anyio.typed_attribute()
    #: the overlay port the stream was opened to (for listeners: the port listened on)
    port: int = anyio.typed_attribute()
    #: the peer's overlay address, as proven by its handshake
    peer_address: Address = anyio.typed_attribute()
    #: the peer's public identity (its keys), as proven by its handshake
    peer_identity: PublicIdentity = anyio.typed_attribute()
    #: "direct" or "relayed"
    path: Path = anyio.typed_attribute()
    #: the UDP endpoint the peer's packets currently come from
    peer_endpoint: tuple[str, int] = anyio.typed_attribute()
    #: the tunnel's smoothed round-trip time in seconds (None before a sample)
    rtt: float | None = anyio.typed_attribute()


class OverlayStream(ByteStream):
    """One reliable, ordered, bidirectional byte stream inside a tunnel.

    `send` waits while the send buffer is full (backpressure), `receive`
    returns bytes as they arrive, `send_eof` half-closes, and `aclose` ends
    both directions: the FIN goes out after every byte already sent (the
    node keeps delivering them after `aclose` returns), and if we had not read
    to the end the peer is told to stop sending. Cancelling any of these
    leaves the stream consistent: a cancelled `send` may have queued a prefix
    of its data, as with a TCP socket.
    """

    def __init__(
        self,
        node: Node,
        tunnel: Tunnel,
        stream_id: int,
        *,
        port: int,
        peer_address: Address,
        peer_identity: PublicIdentity,
    ) -> None:
        self._node = node
        self._tunnel = tunnel
        self._stream_id = stream_id
        self._port = port
        self._peer_address = peer_address
        self._peer_identity = peer_identity
        self._readable: Waiter | None = None
        self._writable: Waiter | None = None
        self._receive_error: BaseException | None = None
        self._send_error: BaseException | None = None
        self._eof_received = False
        self._eof_sent = False
        self.bytes_sent = 0
        """Bytes handed to the tunnel so far (the stream offset of the next byte sent)."""
        self._closed = False
        self._extra: dict[Any, Callable[[], Any]] | None = None
        self._receive_guard = anyio.ResourceGuard("reading from")
        self._send_guard = anyio.ResourceGuard("writing to")
        self._sending = False  # a `send` is under way (`try_send` then declines)
        self._handshake_error: TunnelError | None = None  # how an early stream's handshake failed

    # -- what the node calls --------------------------------------------------------------

    @property
    def key(self) -> tuple[bytes, int]:
        return self._tunnel.peer, self._stream_id

    def _wake_reader(self) -> None:
        if self._readable is not None:
            self._readable.set()
            self._readable = None

    def _wake_writer(self) -> None:
        if self._writable is not None:
            self._writable.set()
            self._writable = None

    def _fail(self, error: TunnelError, *, receive: bool = True, send: bool = True) -> None:
        """The tunnel gave up this direction (or both): waiters see `error`."""
        if receive and self._receive_error is None and not self._eof_received:
            self._receive_error = error
        if send and self._send_error is None and not self._eof_sent:
            self._send_error = error
        self._wake_reader()
        self._wake_writer()

    @property
    def broken(self) -> bool:
        """The tunnel or the peer ended the stream under us (closed, reset, restarted)."""
        return self._receive_error is not None or self._send_error is not None

    @property
    def established(self) -> bool:
        """The stream's tunnel has its keys: what is sent leaves now (see `wait_established`)."""
        return self._tunnel.is_established

    async def wait_established(self) -> None:
        """Return once the stream's tunnel has its keys (at once if it had them).

        For a stream from ``Node.connect(..., wait=False)``: raises
        `HandshakeTimeout` or `TrustRefused` as `connect` would have, also
        when called after the handshake failed; `anyio.ClosedResourceError` if
        the stream was closed or reset here (before or during the wait);
        otherwise the error the stream failed with (`TunnelClosed`, ...).
        """
        tunnel = self._tunnel
        while not tunnel.is_established:
            if self._handshake_error is not None:
                raise self._handshake_error
            if self._closed:
                raise anyio.ClosedResourceError
            error = self._receive_error or self._send_error
            if error is not None:
                raise error
            if tunnel.is_closed:
                raise TunnelClosed(
                    f"the tunnel to {self._peer_address} closed before its handshake finished",
                    address=self._peer_address,
                    port=self._port,
                )
            await self._node._router.wait_handshake(tunnel.peer, self._peer_address, self._port)
        if self._closed:  # closed here while the handshake went on
            raise anyio.ClosedResourceError

    @property
    def _finished(self) -> bool:
        """Nothing more can happen on this stream from our side."""
        return self._closed or (
            (self._eof_received or self._receive_error is not None)
            and (self._eof_sent or self._send_error is not None)
        )

    # -- ByteStream ---------------------------------------------------------------------------

    async def receive(self, max_bytes: int = DEFAULT_RECEIVE_SIZE) -> bytes:
        max_bytes = _whole(max_bytes, "max_bytes")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        with self._receive_guard:
            while True:
                if self._closed:
                    raise anyio.ClosedResourceError
                if self._eof_received:
                    raise anyio.EndOfStream
                if self._receive_error is not None:
                    raise self._receive_error
                tunnel, sid = self._tunnel, self._stream_id
                data = tunnel.read_stream(sid, max_bytes, now=self._node._now())
                at_eof = tunnel.stream_at_eof(sid)
                if at_eof:
                    self._eof_received = True
                if data:
                    if tunnel.wants_to_send:
                        self._node._flush()  # window updates the read released
                    self._node._forget_if_done(self)
                    return data
                if at_eof:
                    self._node._forget_if_done(self)
                    raise anyio.EndOfStream
                waiter = self._readable = self._node._new_waiter()
                await waiter.wait()

    async def send(self, item: bytes) -> None:
        with self._send_guard:
            self._sending = True
            try:
                # Bytes go to the tunnel as they are when they fit (no view, no copy);
                # anything else, or what does not fit, is cut through a memoryview.
                rest: bytes | memoryview = (
                    item if type(item) is bytes else memoryview(item).cast("B")
                )
                while True:
                    if self._closed:
                        raise anyio.ClosedResourceError
                    if self._send_error is not None:
                        raise self._send_error
                    if self._eof_sent:
                        raise anyio.ClosedResourceError("send() after send_eof()")
                    if not rest:
                        return
                    room = self._tunnel.send_buffer_available(self._stream_id)
                    if room:
                        if len(rest) <= room:
                            chunk, rest = rest, b""
                        else:
                            view = memoryview(rest)  # slices of a view copy nothing
                            chunk, rest = view[:room], view[room:]
                        self._push(bytes(chunk))
                        continue
                    waiter = self._writable = self._node._new_waiter()
                    await waiter.wait()
            finally:
                self._sending = False

    async def send_eof(self) -> None:
        """Half-close: the peer reads every byte sent so far, then end-of-stream."""
        if self._closed:
            raise anyio.ClosedResourceError
        if self._send_error is not None:
            raise self._send_error
        if not self._eof_sent:
            self._tunnel.send_stream(self._stream_id, b"", end_stream=True)
            self._eof_sent = True
            self._node._flush()
            self._node._forget_if_done(self)
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.close()
        await anyio.lowlevel.checkpoint()

    def close(self) -> None:
        """Like `aclose` but synchronous (for cleanup paths that cannot await)."""
        if self._closed:
            return
        tunnel, sid = self._tunnel, self._stream_id
        if not tunnel.is_closed and self._send_error is None and not self._eof_sent:
            tunnel.send_stream(sid, b"", end_stream=True)
        if not tunnel.is_closed and self._receive_error is None and not self._eof_received:
            tunnel.stop_sending(sid, ERROR_NO_ERROR)
        self._end_locally()

    def _end_locally(self) -> None:
        """We are done with both directions: wake any waiter and let the node forget us."""
        self._eof_sent = True
        self._closed = True
        self._wake_reader()
        self._wake_writer()
        self._node._flush()
        self._node._forget_if_done(self)

    def reset(self, error_code: int = ERROR_APPLICATION) -> None:
        """Abort both directions now: unsent data is dropped and the peer sees a reset."""
        error_code = _whole(error_code, "error_code")
        if not 0 <= error_code <= MAX_VARINT:
            raise ValueError(f"error_code={error_code}: expected 0..2**62-1")
        if self._closed:
            return
        tunnel, sid = self._tunnel, self._stream_id
        if not tunnel.is_closed:
            tunnel.reset_stream(sid, error_code)
            tunnel.stop_sending(sid, error_code)
        self._end_locally()

    # -- attributes --------------------------------------------------------------------------

    @property
    def peer_address(self) -> Address:
        return self._peer_address

    @property
    def peer_identity(self) -> PublicIdentity:
        return self._peer_identity

    @property
    def port(self) -> int:
        return self._port

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        # Built once: `extra()` is on the HTTP client's per-request path. The
        # values are callables, so what they report stays current.
        if self._extra is None:
            self._extra = self._attributes()
        return self._extra

    def _attributes(self) -> dict[Any, Callable[[], Any]]:
        tunnel = self._tunnel
        return {
            OverlayAttribute.local_address: lambda: self._node.address,
            OverlayAttribute.port: lambda: self._port,
            OverlayAttribute.peer_address: lambda: self._peer_address,
            OverlayAttribute.peer_identity: lambda: self._peer_identity,
            OverlayAttribute.path: lambda: self._node._path_to(tunnel),
            OverlayAttribute.peer_endpoint: lambda: tunnel.remote_addr,
            OverlayAttribute.rtt: lambda: tunnel.smoothed_rtt,
        }

    def __repr__(self) -> str:
        return (
            f"<OverlayStream {self._peer_address}:{self._port} "
            f"id={self._stream_id}{' closed' if self._closed else ''}>"
        )

    def try_send(self, data: bytes | bytearray | memoryview) -> bool:
        """Send all of `data` now if the send buffer has room for it, else nothing.

        For writers of many small messages (the HTTP/2 server): nothing can
        interrupt it, so they need no shielded cancel scope around it, as they
        do around `send`. False when the stream is not writable, another `send`
        is under way, or `data` does not fit; the caller then uses `send`, which
        raises or waits as it should.
        """
        if self._closed or self._send_error is not None or self._eof_sent or self._sending:
            return False
        if isinstance(data, bytes):
            if self._tunnel.send_buffer_available(self._stream_id) < len(data):
                return False
            self._push(data)
            return True
        view = memoryview(data)
        if self._tunnel.send_buffer_available(self._stream_id) < view.nbytes:
            return False
        self._push(view.tobytes())  # copied once it fits: the compiled core takes bytes only
        return True

    def _push(self, data: bytes) -> None:
        """Hand `data`, which the send buffer has room for, to the tunnel and send it."""
        self._tunnel.send_stream(self._stream_id, data)
        self.bytes_sent += len(data)
        self._node._flush()


class OverlayListener(Listener[OverlayStream]):
    """Streams opened by peers to one overlay port of this node."""

    def __init__(self, node: Node, port: int, *, backlog: int = DEFAULT_BACKLOG) -> None:
        self._node = node
        self._port = port
        self._backlog = backlog
        self._pending: deque[OverlayStream] = deque()
        self._arrived: Waiter | None = None
        self._closed = False

    @property
    def port(self) -> int:
        return self._port

    def _offer(self, stream: OverlayStream) -> bool:
        """Queue an incoming stream; False when the backlog is full (the node refuses it)."""
        if self._closed or len(self._pending) >= self._backlog:
            return False
        self._pending.append(stream)
        if self._arrived is not None:
            self._arrived.set()
            self._arrived = None
        return True

    async def accept(self) -> OverlayStream:
        """The next stream a peer opened to this port."""
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._pending:
                await anyio.lowlevel.checkpoint()
                if self._pending:
                    return self._pending.popleft()
                continue
            waiter = self._arrived = self._node._new_waiter()
            await waiter.wait()

    async def serve(
        self,
        handler: Callable[[OverlayStream], Any],
        task_group: TaskGroup | None = None,
    ) -> None:
        """Run ``handler(stream)`` in a task for every incoming stream, until closed."""

        async def run(stream: OverlayStream) -> None:
            async with stream:
                await handler(stream)

        async with anyio.create_task_group() as own:
            group = task_group or own
            while True:
                try:
                    stream = await self.accept()
                except anyio.ClosedResourceError:
                    return
                group.start_soon(run, stream)

    async def aclose(self) -> None:
        self.close()
        await anyio.lowlevel.checkpoint()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._node._unlisten(self._port)
        while self._pending:
            self._pending.popleft().reset(ERROR_NO_ERROR)
        if self._arrived is not None:
            self._arrived.set()
            self._arrived = None

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {
            OverlayAttribute.local_address: lambda: self._node.address,
            OverlayAttribute.port: lambda: self._port,
        }

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<OverlayListener {self._node.address}:{self._port}{state}>"


def _whole(value: int, name: str) -> int:
    """`value` as an int (see `whole_number`); TypeError naming `name` otherwise."""
    whole = whole_number(value)
    if whole is None:
        raise TypeError(f"{name}={value!r}: expected a whole number")
    return whole
