"""Routing the endpoint's events to the streams, listeners and `connect` calls they concern.

The sans-IO endpoint reports what happened (data readable, stream reset,
handshake done, tunnel closed); the router holds the node's table of live
`OverlayStream`s, its listeners and its pending handshakes, and turns each
event into a wake-up or an error that names the peer and the port.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from .._address import Address
from .._exceptions import (
    HandshakeTimeout,
    PeerRestarted,
    PortUnreachable,
    StreamReset,
    TrustRefused,
    TunnelClosed,
    TunnelError,
)
from .._protocol import _events as ev
from .._protocol._endpoint import Endpoint
from ._stream import OverlayListener, OverlayStream

if TYPE_CHECKING:
    from ._node import Node

__all__ = ["Router"]

logger = logging.getLogger("overlay_httpx")


class _Handshake:
    """One handshake in progress that `connect` calls are waiting for."""

    __slots__ = ("done", "error", "message")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: type[TunnelError] | None = None
        self.message = ""


class Router:
    """The node's streams, listeners and pending handshakes, kept current by endpoint events."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.streams: dict[tuple[bytes, int], OverlayStream] = {}
        self.listeners: dict[int, OverlayListener] = {}
        self.handshakes: dict[bytes, _Handshake] = {}
        self.path_changed = anyio.Event()  # set (and replaced) whenever a tunnel moves

    def add(self, stream: OverlayStream) -> None:
        self.streams[stream.key] = stream

    def close_all(self, message: str) -> None:
        """The node is closing: listeners stop, streams and waiting connects fail."""
        for listener in list(self.listeners.values()):
            listener.close()
        for stream in list(self.streams.values()):
            stream._fail(TunnelClosed(message, address=stream.peer_address, port=stream.port))
        self.streams.clear()
        for key in list(self.handshakes):
            self.finish_handshake(key, TunnelClosed, message)

    def peer_streams(self, peer: bytes) -> list[OverlayStream]:
        return [s for k, s in self.streams.items() if k[0] == peer]

    def forget_if_done(self, stream: OverlayStream) -> None:
        if stream._finished and self.streams.get(stream.key) is stream:
            del self.streams[stream.key]

    async def wait_handshake(self, key: bytes, address: Address, port: int) -> None:
        handshake = self.handshakes.get(key)
        if handshake is None:
            handshake = self.handshakes[key] = _Handshake()
        await handshake.done.wait()
        if handshake.error is not None:
            raise handshake.error(handshake.message, address=address, port=port)

    def finish_handshake(self, key: bytes, error: type[TunnelError] | None, message: str) -> None:
        handshake = self.handshakes.pop(key, None)
        if handshake is not None:
            handshake.error = error
            handshake.message = message
            handshake.done.set()

    def _handshake_failed(self, key: bytes, error: type[TunnelError], message: str) -> None:
        """Waiting connects fail, and so will `wait_established` on the streams opened
        early on that tunnel (their `TunnelClosed` follows)."""
        self.finish_handshake(key, error, message)
        for stream in self.peer_streams(key):
            if not stream.broken:
                stream._handshake_error = error(
                    message, address=stream.peer_address, port=stream.port
                )

    def process(self, endpoint: Endpoint) -> None:
        """Act on every event the endpoint has queued."""
        if not endpoint.events:
            return  # the usual flush: nothing happened (runs after every one)
        streams = self.streams
        while (event := endpoint.next_event()) is not None:
            kind = type(event)
            if kind is ev.StreamReadable:
                stream = streams.get((event.peer, event.stream_id))  # type: ignore[union-attr]
                if stream is not None:
                    stream._wake_reader()
            elif kind is ev.StreamWritable:
                stream = streams.get((event.peer, event.stream_id))  # type: ignore[union-attr]
                if stream is not None:
                    stream._wake_writer()
            elif isinstance(event, ev.StreamOpened):
                self._on_stream_opened(endpoint, event)
            elif isinstance(event, ev.StreamReset):
                self._on_stream_reset(event)
            elif isinstance(event, ev.StreamStopSending):
                stream = streams.get((event.peer, event.stream_id))
                if stream is not None:
                    stream._fail(
                        StreamReset(
                            f"{stream.peer_address} stopped reading the stream to port "
                            f"{stream.port} (error {event.error_code})",
                            address=stream.peer_address,
                            port=stream.port,
                            error_code=event.error_code,
                        ),
                        receive=False,
                    )
                    self.forget_if_done(stream)
            elif isinstance(event, ev.StreamMoved):
                stream = streams.pop((event.peer, event.old_stream_id), None)
                if stream is not None:
                    stream._stream_id = event.new_stream_id
                    streams[stream.key] = stream
            elif isinstance(event, ev.HandshakeCompleted):
                self._on_handshake(event)
            elif isinstance(event, ev.HandshakeFailed):
                logger.debug("handshake with %s failed: %s", event.peer.hex()[:16], event.reason)
                if event.refused:
                    text = f"{self._name(event.peer)} {event.reason}"
                    self._handshake_failed(event.peer, TrustRefused, text)
                else:
                    self._handshake_failed(event.peer, HandshakeTimeout, self._timeout_text(event))
            elif isinstance(event, ev.PathChanged):
                logger.debug(
                    "path to %s moved from %s:%s to %s:%s",
                    self._name(event.peer),
                    *event.old,
                    *event.new,
                )
                self.path_changed.set()
                self.path_changed = anyio.Event()
            elif isinstance(event, ev.TunnelClosed):
                self._on_tunnel_closed(event)

    def _name(self, peer: bytes) -> str:
        tunnel = self._node._endpoint.tunnel(peer) if self._node._endpoint is not None else None
        if tunnel is not None and tunnel.peer_address is not None:
            return str(tunnel.peer_address)
        return f"peer {peer.hex()[:16]}"

    def _timeout_text(self, event: ev.HandshakeFailed) -> str:
        for peer in self._node._peers.values():
            if peer.identity.x25519 == event.peer:
                host, port = peer.endpoint
                return f"no handshake answer from {peer.address} at {host}:{port}: {event.reason}"
        return f"no handshake answer from {self._name(event.peer)}: {event.reason}"

    def _on_stream_opened(self, endpoint: Endpoint, event: ev.StreamOpened) -> None:
        tunnel = endpoint.tunnel(event.peer)
        if tunnel is None or tunnel.peer_address is None or tunnel.peer_identity is None:
            return
        stream = OverlayStream(
            self._node,
            tunnel,
            event.stream_id,
            port=event.port,
            peer_address=tunnel.peer_address,
            peer_identity=tunnel.peer_identity,
        )
        self.streams[stream.key] = stream
        listener = self.listeners.get(event.port)
        if listener is None or not listener._offer(stream):
            logger.debug("refused a stream from %s to port %d", stream.peer_address, event.port)
            stream.reset(ev.ERROR_PORT_UNREACHABLE if listener is None else ev.ERROR_STREAM_LIMIT)

    def _on_stream_reset(self, event: ev.StreamReset) -> None:
        stream = self.streams.get((event.peer, event.stream_id))
        if stream is None:
            return
        where = f"{stream.peer_address} port {stream.port}"
        code = event.error_code
        both = True
        error: TunnelError
        if code == ev.ERROR_PORT_UNREACHABLE:
            error = PortUnreachable(
                f"nobody listens on overlay port {stream.port} at {stream.peer_address}",
                address=stream.peer_address,
                port=stream.port,
                error_code=code,
            )
        elif code == ev.ERROR_PEER_RESTARTED:
            error = PeerRestarted(
                f"{stream.peer_address} restarted; the stream to port {stream.port} was lost",
                address=stream.peer_address,
                port=stream.port,
                delivered=event.delivered,
            )
        elif code in (ev.ERROR_TUNNEL_CLOSED, ev.ERROR_IDLE_TIMEOUT):
            return  # the TunnelClosed event that follows says who closed it and why
        else:
            both = False
            error = StreamReset(
                f"{where}: the peer reset the stream (error {code})",
                address=stream.peer_address,
                port=stream.port,
                error_code=code,
            )
        stream._fail(error, send=both)
        self.forget_if_done(stream)

    def _on_handshake(self, event: ev.HandshakeCompleted) -> None:
        logger.debug(
            "handshake with %s at %s:%d complete%s",
            event.address,
            *event.endpoint,
            " (peer restarted)" if event.peer_restarted else " (rekey)" if event.rekey else "",
        )
        self.finish_handshake(event.peer, None, "")

    def _on_tunnel_closed(self, event: ev.TunnelClosed) -> None:
        name = self._name(event.peer)
        logger.debug(
            "tunnel to %s closed%s: %s", name, " by peer" if event.by_peer else "", event.reason
        )
        message = (
            f"tunnel to {name} closed{' by the peer' if event.by_peer else ''}: {event.reason}"
        )
        self.finish_handshake(event.peer, TunnelClosed, message)
        for stream in self.peer_streams(event.peer):
            stream._fail(
                TunnelClosed(
                    message, address=stream.peer_address, port=stream.port, by_peer=event.by_peer
                )
            )
            self.forget_if_done(stream)
