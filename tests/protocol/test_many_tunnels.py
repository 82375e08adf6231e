"""One endpoint with many peers: a flush asks only the tunnels something happened to, and
every tunnel's timers still fire (keepalives, idle timeouts) at their time."""

from __future__ import annotations

import pytest
from _build import patches_the_core
from _harness import B_ADDR, App, echo_round_trip, make_pair

from overlay_httpx import Address, Identity
from overlay_httpx._protocol._config import TunnelConfig
from overlay_httpx._protocol._endpoint import Endpoint
from overlay_httpx._protocol._events import TunnelClosed
from overlay_httpx._protocol._tunnel import Tunnel
from overlay_httpx.testing import LinkConfig, Network

SERVER_ADDR = B_ADDR  # where `echo_round_trip` goes


def _star(count: int, config: TunnelConfig) -> tuple[Network, App, list[App]]:
    """A server and `count` clients, each with one finished echo over its own tunnel."""
    net = Network(seed=5, link=LinkConfig(delay=0.002))
    server = App(
        Endpoint(Identity.generate(), Address(1, 1), config=config, timestamp_origin_ns=10**18),
        echo=True,
    )
    server.endpoint.listen(80)
    net.add(server, SERVER_ADDR)
    clients = []
    for i in range(count):
        client = App(
            Endpoint(Identity.generate(), Address(2, i), config=config, timestamp_origin_ns=10**18)
        )
        net.add(client, (f"10.1.0.{i + 1}", 4000))
        clients.append(client)
    for client in clients:
        net.run_for(0.01)  # within the server's handshake budget
        tunnel = client.endpoint.connect(server.endpoint.public, SERVER_ADDR, net.now)
        sid = tunnel.open_stream(80, net.now)
        client.write(tunnel, sid, b"hello", fin=True)
    assert net.run(until=lambda: all(_echoed(c) for c in clients), timeout=30)
    assert len(server.endpoint.tunnels()) == count
    return net, server, clients


def _echoed(app: App) -> bool:
    return any(st.eof and st.received == b"hello" for st in app.streams.values())


@patches_the_core
def test_a_flush_asks_only_the_tunnel_that_received_a_datagram(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net, server, clients = _star(60, TunnelConfig())
    net.run_for(1.0)  # every ACK is out, every tunnel quiet
    calls: list[bytes] = []
    real = Tunnel.datagrams_to_send

    def counted(self: Tunnel, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        calls.append(self.peer)
        return real(self, now)

    monkeypatch.setattr(Tunnel, "datagrams_to_send", counted)
    server.endpoint.datagrams_to_send(net.now)
    server.endpoint.get_timer()
    assert calls == []  # nothing happened to any of the 60
    client = clients[17]
    tunnel = client.endpoint.tunnel(server.endpoint.public)
    assert tunnel is not None
    sid = tunnel.open_stream(80, net.now)
    client.write(tunnel, sid, b"again", fin=True)
    st = client.state(tunnel, sid)
    assert net.run(until=lambda: st.eof, timeout=5)
    assert st.received == b"again"
    # Only the two ends of that one tunnel were asked for datagrams (each endpoint is
    # flushed after every delivery), not the server's other 59 tunnels.
    assert set(calls) == {client.endpoint.public.x25519, server.endpoint.public.x25519}


@pytest.mark.parametrize("persistent", [True, False])
def test_every_tunnel_of_many_keeps_its_timers(persistent: bool) -> None:
    net, server, clients = _star(40, TunnelConfig(persistent_keepalive=persistent))
    start = net.now
    net.run_for(600.0)
    closed = server.of(TunnelClosed)
    if persistent:  # each tunnel's keepalive fired on time, every time
        assert closed == []
        assert all(not c.of(TunnelClosed) for c in clients)
        echo_round_trip(net, clients[0], server)  # the echo listener still answers
    else:  # each tunnel's idle timeout fired, at its own time
        assert len(closed) == 40
        assert {e.reason for e in closed} == {"idle timeout"}  # type: ignore[attr-defined]
        assert server.endpoint.tunnels() == []  # all drained and forgotten
        assert net.now - start == pytest.approx(600.0)


def test_a_call_on_a_replaced_tunnel_object_does_not_hide_its_successor() -> None:
    """A late call on the old object of a peer's closed tunnel must not take the place
    of the new tunnel's mark: the new one's INIT still leaves and its timers still run."""
    net, a, b = make_pair()
    echo_round_trip(net, a, b)
    old = a.endpoint.tunnel(b.endpoint.public)
    assert old is not None
    sid = old.stream_ids()[0] if old.stream_ids() else 0
    old.close(net.now, reason="done")
    net.run_for(5.0)  # drained and forgotten
    assert a.endpoint.tunnel(b.endpoint.public) is None
    new = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    assert old.read_stream(sid, now=net.now) == b""  # a straggling read on the old object
    assert net.run(until=lambda: new.is_established, timeout=5)
    echo_round_trip(net, a, b)
