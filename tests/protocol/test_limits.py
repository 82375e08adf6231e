"""A peer that ignores the limits it was given loses its own tunnel, with a reason,
and the node goes on serving everyone else (virtual clock).

The hostile peer is a real endpoint with its own view of our limits
overwritten, so what reaches us is exactly what a modified peer would send.
"""

from __future__ import annotations

import logging

import pytest
from _harness import B_ADDR, App, echo_round_trip, established, make_pair, payload

from overlay_httpx import Address, Identity
from overlay_httpx._protocol._config import TunnelConfig
from overlay_httpx._protocol._endpoint import Endpoint
from overlay_httpx._protocol._events import ERROR_PROTOCOL, StreamReadable, TunnelClosed
from overlay_httpx._protocol._packet import TYPE_RELAY
from overlay_httpx._protocol._streams import SendCredit
from overlay_httpx._protocol._tunnel import Tunnel
from overlay_httpx.testing import Network

C_ADDR = ("10.0.0.3", 6000)


class _Hoarder(App):
    """An application that never reads what arrives (its buffers are all flow control has)."""

    def _process(self, now: float) -> None:
        while (event := self.endpoint.next_event()) is not None:
            if not isinstance(event, StreamReadable):
                self.events.append(event)


def _hostile_peer(net: Network, b: App, config: TunnelConfig) -> tuple[App, Tunnel]:
    c = App(Endpoint(Identity.generate(), Address(1, 3), config=config, timestamp_origin_ns=1))
    net.add(c, C_ADDR)
    tunnel = c.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    assert net.run(until=lambda: established(c), timeout=5)
    return c, tunnel


def _closed_by(app: App, peer: bytes) -> TunnelClosed:
    [closed] = [e for e in app.of(TunnelClosed) if e.peer == peer]
    return closed


def test_a_peer_opening_streams_past_the_limit_loses_its_tunnel_and_only_it() -> None:
    config = TunnelConfig(max_streams=16)
    net, a, b = make_pair(config=config)
    echo_round_trip(net, a, b)
    c, tunnel = _hostile_peer(net, b, config)
    tunnel._conn._peer_max_streams = 10**6  # c no longer believes our limit
    for _ in range(40):  # and keeps them all open (no FIN): nothing is given back
        c.write(tunnel, tunnel.open_stream(80, net.now), b"x")
    assert net.run(until=lambda: bool(c.of(TunnelClosed)), timeout=10)
    ours = _closed_by(b, c.endpoint.public.x25519)
    theirs = _closed_by(c, b.endpoint.public.x25519)
    assert "beyond the limit of 16" in ours.reason
    assert not ours.by_peer
    assert theirs.by_peer
    assert "beyond the limit of 16" in theirs.reason  # the offender is told why
    assert ours.reason == f"protocol violation by peer: {theirs.reason}"
    assert theirs.error_code == ERROR_PROTOCOL
    echo_round_trip(net, a, b)  # the well-behaved peer is still served
    assert [t.peer for t in b.endpoint.tunnels() if not t.is_closed] == [a.endpoint.public.x25519]


def test_a_peer_sending_past_its_flow_control_credit_loses_its_tunnel_and_only_it() -> None:
    window = 64 * 1024
    config = TunnelConfig(initial_max_stream_data=window, max_stream_data_window=window)
    net, a, _ = make_pair(config=config)
    b = _Hoarder(Endpoint(Identity.generate(), Address(1, 4), config=config, timestamp_origin_ns=1))
    b.endpoint.listen(80)
    net.add(b, ("10.0.0.4", 7000))
    # A well-behaved sender to an app that never reads is held back, never cut off.
    polite = a.endpoint.connect(b.endpoint.public, ("10.0.0.4", 7000), net.now)
    sid = polite.open_stream(80, net.now)
    a.write(polite, sid, payload(4 * window), fin=True)
    net.run_for(5.0)
    assert not polite.is_closed
    assert polite.stream_ids() == [sid]
    assert polite._conn._streams[sid].send.highest_sent == window  # it waits for credit
    buffered = b.endpoint.tunnel(a.endpoint.public.x25519)
    assert buffered is not None
    assert buffered._conn._streams[sid].recv.buffered == window  # what we hold is bounded
    # A sender that ignores the credit is cut off with the reason.
    c = App(Endpoint(Identity.generate(), Address(1, 3), config=config, timestamp_origin_ns=1))
    net.add(c, C_ADDR)
    greedy = c.endpoint.connect(b.endpoint.public, ("10.0.0.4", 7000), net.now)
    assert net.run(until=lambda: established(c), timeout=5)
    greedy._conn._peer_stream_credit = 10**9
    greedy._conn._conn_credit = SendCredit(10**9)
    c.write(greedy, greedy.open_stream(80, net.now), payload(4 * window))
    assert net.run(until=lambda: bool(c.of(TunnelClosed)), timeout=10)
    ours = _closed_by(b, c.endpoint.public.x25519)
    assert "past the advertised limit" in ours.reason
    assert "past the advertised limit" in _closed_by(c, b.endpoint.public.x25519).reason
    assert not polite.is_closed  # the polite one is untouched
    assert polite.stream_ids() == [sid]


def test_an_internal_error_drops_the_datagram_and_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug of ours on one datagram must neither crash the node nor pass unseen (a
    silently dropped datagram looks like a stalled transfer); the log is bounded.
    The bug here is a relay forwarder that raises: a hook, so that both builds of
    the core (pure and compiled) run it."""

    def broken(data: bytes, addr: tuple[str, int], now: float) -> None:
        raise NameError("a bug")

    endpoint = Endpoint(Identity.generate(), Address(1, 2))
    endpoint.relay_forwarder = broken
    with caplog.at_level(logging.ERROR, logger="overlay_httpx"):
        for _ in range(25):
            endpoint.receive_datagram(bytes([TYPE_RELAY]) + bytes(40), ("10.0.0.1", 4000), 1.0)
    assert endpoint.statistics().drops["internal_error"] == 25
    assert len(caplog.records) == 10
    record = caplog.records[0]
    assert "internal error on a datagram from 10.0.0.1:4000" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], NameError)
