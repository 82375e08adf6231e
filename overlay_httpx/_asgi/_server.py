"""`serve()` and `OverlayServer`: an ASGI app on an overlay port, over HTTP/2.

One overlay stream is one HTTP/2 connection (prior knowledge, no TLS: the
tunnel already encrypts and authenticates both ends) from one peer, carrying
many concurrent requests. The server runs the app's lifespan around the
connections and shuts down gracefully whether it is cancelled or asked to.
"""

from __future__ import annotations

import functools
import logging
from typing import Final

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .._exceptions import LifespanFailed, LocalProtocolError
from .._node import Node, OverlayAttribute, OverlayListener, OverlayStream
from ._connection import Connection, prepare_h2
from ._lifespan import Lifespan
from ._scope import ConnectionInfo
from ._types import ASGIApp, LifespanMode

logger = logging.getLogger("overlay_httpx")

__all__ = ["OverlayServer", "serve"]

_MAX_STREAMS_LIMIT: Final = 2**31 - 1


class OverlayServer:
    """Serves one ASGI 3 app (FastAPI, Starlette, ...) on one overlay port of a node.

    ::

        server = OverlayServer(app, node, port=80)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)   # listening, lifespan startup done
            ...
            await server.shutdown()        # or cancel the task group

    Stopping, by `shutdown` or by cancelling `serve`, is graceful: stop
    accepting, send every connection a GOAWAY naming the last request it will
    answer, let the requests in flight finish for up to `shutdown_timeout`
    seconds, reset what is left, then run the lifespan shutdown.

    Each request's scope carries ``scope["extensions"]["overlay"]``: the
    caller's ``peer_address`` and ``peer_identity`` as its tunnel handshake
    proved them, and the tunnel's ``path`` ("direct" or "relayed"), so an app
    can authorize callers by key. ``scope["client"]`` is the caller's overlay
    address and port 0 (overlay streams have no source port).

    When nothing arrives from a peer for `idle_timeout` seconds (None: never),
    its connection closes gracefully if no request is open (clients reconnect
    without a round trip, and streams that never spoke HTTP/2 are freed), and
    a request whose app waits for a body that stopped coming is reset (the app
    sees ``http.disconnect``). It is the write timeout too, whatever else the
    peer sends: a response that the peer gives no flow-control window for that
    long is reset (its app sees ``http.disconnect``), and a connection whose
    peer leaves our writes unread that long is closed.
    """

    def __init__(
        self,
        app: ASGIApp,
        node: Node,
        *,
        port: int = 80,
        root_path: str = "",
        lifespan: LifespanMode = "auto",
        max_concurrent_streams: int = 100,
        max_header_list_size: int = 65536,
        max_body_size: int | None = None,
        shutdown_timeout: float = 5.0,
        idle_timeout: float | None = 60.0,
    ) -> None:
        if max_body_size is not None and (
            isinstance(max_body_size, bool)
            or not isinstance(max_body_size, int)
            or max_body_size < 0
        ):
            raise LocalProtocolError(
                f"max_body_size={max_body_size!r}: expected a byte count >= 0, or None for no limit"
            )
        if not callable(app):
            raise LocalProtocolError(f"app {app!r}: expected an ASGI 3 callable")
        if lifespan not in ("auto", "on", "off"):
            raise LocalProtocolError(f"lifespan={lifespan!r}: expected 'auto', 'on' or 'off'")
        if not 1 <= max_concurrent_streams <= _MAX_STREAMS_LIMIT:
            raise LocalProtocolError(
                f"max_concurrent_streams={max_concurrent_streams}: expected 1..{_MAX_STREAMS_LIMIT}"
            )
        if not 1024 <= max_header_list_size <= 2**30:
            raise LocalProtocolError(
                f"max_header_list_size={max_header_list_size}: expected 1024..{2**30}"
            )
        if shutdown_timeout < 0:
            raise LocalProtocolError(f"shutdown_timeout={shutdown_timeout}: expected >= 0")
        if idle_timeout is not None and not idle_timeout > 0:
            raise LocalProtocolError(
                f"idle_timeout={idle_timeout!r}: expected seconds > 0, or None to never reap"
            )
        if root_path.endswith("/"):
            raise LocalProtocolError(f"root_path={root_path!r}: must not end with '/'")
        self._app = app
        self._node = node
        self._port = port
        self._root_path = root_path
        self._lifespan = Lifespan(app, lifespan)
        self._max_streams = max_concurrent_streams
        self._max_header_list_size = max_header_list_size
        self._max_body_size = max_body_size
        self._shutdown_timeout = shutdown_timeout
        self._idle_timeout = idle_timeout
        self._connections: set[Connection] = set()
        self._connections_changed: anyio.Event | None = None
        self._listener: OverlayListener | None = None
        self._startup_scope: anyio.CancelScope | None = None
        self._stop_requested = False
        self._done: anyio.Event | None = None
        self._error: BaseException | None = None
        self._state = "new"

    @property
    def port(self) -> int:
        return self._port

    @property
    def node(self) -> Node:
        return self._node

    @property
    def connections(self) -> int:
        """HTTP/2 connections open now (one per peer, usually)."""
        return len(self._connections)

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen, run lifespan startup, then serve until `shutdown` or cancellation.

        ``task_status.started()`` is called once the port is listened on and
        startup has completed, so ``await task_group.start(server.serve)``
        returns when requests can be served. A failed startup raises
        `LifespanFailed`. Returns after `shutdown` completes, or once the node
        closes under it (its listener ends, so the server drains and stops).
        """
        if self._state != "new":
            raise LocalProtocolError(f"this OverlayServer is {self._state}; create a new one")
        listener = self._listener = await self._node.listen(self._port)
        self._state = "starting"
        self._done = anyio.Event()
        ready = anyio.Event()
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._run, listener, ready)
                try:
                    await ready.wait()
                    if self._state == "serving":
                        task_status.started()
                    await self._done.wait()
                finally:
                    self._request_stop()
        finally:
            listener.close()
        if self._error is not None:
            raise self._error

    async def shutdown(self) -> None:
        """Stop gracefully (see the class docs) and return once `serve` has finished."""
        self._request_stop()
        if self._done is not None:
            await self._done.wait()
        else:
            self._state = "stopped"
            await anyio.lowlevel.checkpoint()

    # -- internals ----------------------------------------------------------------------------

    def _request_stop(self) -> None:
        if self._stop_requested:
            return
        self._stop_requested = True
        if self._startup_scope is not None:
            self._startup_scope.cancel()
        if self._listener is not None:
            self._listener.close()  # accept() ends; new streams to the port are refused

    async def _run(self, listener: OverlayListener, ready: anyio.Event) -> None:
        """Everything after `listen`, shielded so that cancelling `serve` still drains."""
        assert self._done is not None
        try:
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as task_group:
                    with anyio.CancelScope() as self._startup_scope:
                        try:
                            await self._lifespan.startup(task_group)
                        except LifespanFailed as exc:
                            self._error = exc
                    self._startup_scope = None
                    if self._error is None and not self._stop_requested:
                        prepare_h2(self._max_streams, self._max_header_list_size)
                        self._state = "serving"
                        ready.set()
                        await self._accept(listener, task_group)
                        await self._drain()
                    self._state = "stopping"
                    ready.set()
                    await self._lifespan.shutdown()
                    task_group.cancel_scope.cancel()
        finally:
            self._state = "stopped"
            ready.set()
            self._done.set()

    async def _accept(self, listener: OverlayListener, task_group: TaskGroup) -> None:
        state = self._lifespan.state if self._lifespan.running else None
        while True:
            try:
                stream = await listener.accept()
            except anyio.ClosedResourceError:
                return
            connection = Connection(
                stream,
                self._app,
                self._info(stream, state),
                max_concurrent_streams=self._max_streams,
                idle_timeout=self._idle_timeout,
            )
            self._connections.add(connection)
            task_group.start_soon(self._run_connection, connection)
            limits = (self._max_streams, self._max_header_list_size)
            self._node._later(
                ("HTTP/2 server state", limits), functools.partial(prepare_h2, *limits)
            )

    def _info(self, stream: OverlayStream, state: dict[str, object] | None) -> ConnectionInfo:
        peer = stream.extra(OverlayAttribute.peer_address)
        return ConnectionInfo(
            server=(str(self._node.address), self._port),
            client=(str(peer), 0),
            root_path=self._root_path,
            peer_address=peer,
            peer_identity=stream.extra(OverlayAttribute.peer_identity),
            path=functools.partial(stream.extra, OverlayAttribute.path),
            max_header_list_size=self._max_header_list_size,
            max_body_size=self._max_body_size,
            state=state,
        )

    async def _run_connection(self, connection: Connection) -> None:
        try:
            await connection.run()
        except Exception:
            # One broken connection must never take the server down with it.
            logger.exception("an HTTP/2 connection on overlay port %d failed", self.port)
        finally:
            self._connections.discard(connection)
            event = self._connections_changed
            if event is not None:
                self._connections_changed = None
                event.set()

    async def _wait_connections_closed(self) -> None:
        while self._connections:
            event = self._connections_changed
            if event is None:
                event = self._connections_changed = anyio.Event()
            await event.wait()

    async def _drain(self) -> None:
        for connection in list(self._connections):
            connection.start_shutdown()
        with anyio.move_on_after(self._shutdown_timeout):
            await self._wait_connections_closed()
        for connection in list(self._connections):
            connection.abort()
        await self._wait_connections_closed()


async def serve(
    app: ASGIApp,
    node: Node,
    *,
    port: int = 80,
    root_path: str = "",
    lifespan: LifespanMode = "auto",
    max_concurrent_streams: int = 100,
    max_header_list_size: int = 65536,
    max_body_size: int | None = None,
    shutdown_timeout: float = 5.0,
    idle_timeout: float | None = 60.0,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve an ASGI 3 app on overlay `port` of `node` over HTTP/2 until cancelled.

    ::

        async with Node(identity) as node, anyio.create_task_group() as tg:
            await tg.start(serve, app, node)   # listening, lifespan startup done

    Cancelling it shuts down gracefully (see `OverlayServer`, which also
    offers an explicit `shutdown`). A failed lifespan startup raises
    `LifespanFailed`.
    """
    server = OverlayServer(
        app,
        node,
        port=port,
        root_path=root_path,
        lifespan=lifespan,
        max_concurrent_streams=max_concurrent_streams,
        max_header_list_size=max_header_list_size,
        max_body_size=max_body_size,
        shutdown_timeout=shutdown_timeout,
        idle_timeout=idle_timeout,
    )
    await server.serve(task_status=task_status)
