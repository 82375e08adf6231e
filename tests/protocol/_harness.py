"""Two application-driven endpoints over the in-memory network."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from overlay_httpx import Address, Identity
from overlay_httpx._protocol._config import TunnelConfig
from overlay_httpx._protocol._endpoint import Endpoint
from overlay_httpx._protocol._events import (
    Event,
    HandshakeCompleted,
    StreamMoved,
    StreamOpened,
    StreamReadable,
    StreamReset,
    TunnelClosed,
)
from overlay_httpx._protocol._tunnel import Tunnel
from overlay_httpx.testing import LinkConfig, Network

A_ADDR = ("10.0.0.1", 4000)
B_ADDR = ("10.0.0.2", 5000)


@dataclass
class StreamState:
    received: bytearray = field(default_factory=bytearray)
    eof: bool = False
    reset: int | None = None
    to_send: bytearray = field(default_factory=bytearray)
    send_fin: bool = False
    fin_queued: bool = False


class App:
    """An Endpoint plus a tiny application: reads everything, writes what it is given.

    With ``echo=True`` every byte received on a peer-opened stream is sent back,
    and the FIN is echoed too.
    """

    def __init__(self, endpoint: Endpoint, *, echo: bool = False) -> None:
        self.endpoint = endpoint
        self.echo = echo
        self.events: list[Event] = []
        self.streams: dict[tuple[bytes, int], StreamState] = {}
        self.now = 0.0

    # Endpoint protocol --------------------------------------------------------
    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        self.now = now
        self.endpoint.receive_datagram(data, addr, now)
        self._process(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        self.now = now
        self._pump(now)
        return self.endpoint.datagrams_to_send(now)

    def get_timer(self) -> float | None:
        return self.endpoint.get_timer()

    def handle_timer(self, now: float) -> None:
        self.now = now
        self.endpoint.handle_timer(now)
        self._process(now)

    # application ------------------------------------------------------------------
    def state(self, tunnel: Tunnel, stream_id: int) -> StreamState:
        return self.streams.setdefault((tunnel.peer, stream_id), StreamState())

    def write(self, tunnel: Tunnel, stream_id: int, data: bytes, *, fin: bool = False) -> None:
        st = self.state(tunnel, stream_id)
        st.to_send += data
        st.send_fin = st.send_fin or fin

    def _pump(self, now: float) -> None:
        for (peer, sid), st in self.streams.items():
            tunnel = self.endpoint.tunnel(peer)
            if tunnel is None or tunnel.is_closed or sid not in tunnel.stream_ids():
                continue
            if st.to_send:
                n = min(len(st.to_send), tunnel.send_buffer_available(sid))
                if n:
                    tunnel.send_stream(sid, bytes(st.to_send[:n]))
                    del st.to_send[:n]
            if not st.to_send and st.send_fin and not st.fin_queued:
                st.fin_queued = True
                tunnel.send_stream(sid, b"", end_stream=True)

    def _process(self, now: float) -> None:
        while (event := self.endpoint.next_event()) is not None:
            self.events.append(event)
            if isinstance(event, StreamReadable):
                tunnel = self.endpoint.tunnel(event.peer)
                assert tunnel is not None
                st = self.streams.setdefault((event.peer, event.stream_id), StreamState())
                data = tunnel.read_stream(event.stream_id, now=now)
                st.received += data
                if self.echo and data:
                    st.to_send += data
                if tunnel.stream_at_eof(event.stream_id) and not st.eof:
                    st.eof = True
                    if self.echo:
                        st.send_fin = True
            elif isinstance(event, StreamOpened):
                self.streams.setdefault((event.peer, event.stream_id), StreamState())
            elif isinstance(event, StreamMoved):
                moved = self.streams.pop((event.peer, event.old_stream_id), None)
                if moved is not None:
                    self.streams[(event.peer, event.new_stream_id)] = moved
            elif isinstance(event, StreamReset):
                st = self.streams.setdefault((event.peer, event.stream_id), StreamState())
                st.reset = event.error_code
        self._pump(now)

    def of(self, kind: type) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]


def make_pair(
    *,
    seed: int = 1,
    link: LinkConfig | None = None,
    config: TunnelConfig | None = None,
    echo: bool = True,
    record: bool = False,
) -> tuple[Network, App, App]:
    net = Network(seed=seed, link=link or LinkConfig(delay=0.005), record=record)
    cfg = config or TunnelConfig()
    a = App(Endpoint(Identity.generate(), Address(1, 1), config=cfg, timestamp_origin_ns=10**18))
    b = App(
        Endpoint(Identity.generate(), Address(1, 2), config=cfg, timestamp_origin_ns=10**18),
        echo=echo,
    )
    b.endpoint.listen(80)
    net.add(a, A_ADDR)
    net.add(b, B_ADDR)
    return net, a, b


def payload(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def established(app: App) -> bool:
    return bool(app.of(HandshakeCompleted))


def closed(app: App) -> bool:
    return bool(app.of(TunnelClosed))


def echo_round_trip(net: Network, a: App, b: App, size: int = 2000) -> None:
    """`a` sends `size` bytes to `b`'s echo listener on port 80 and gets them all back."""
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    sid = tunnel.open_stream(80, net.now)
    data = payload(size, seed=size)
    a.write(tunnel, sid, data, fin=True)
    st = a.state(tunnel, sid)
    assert net.run(until=lambda: st.eof, timeout=30)
    assert hashlib.sha256(st.received).digest() == hashlib.sha256(data).digest()
