"""Handshake floods: stateless cookies, per-source limits and reaping of unconfirmed
handshakes keep the responder's work and memory bounded (virtual clock)."""

from __future__ import annotations

from _harness import B_ADDR, App, echo_round_trip, make_pair

from overlay_httpx import Address, Identity
from overlay_httpx._protocol._config import TunnelConfig
from overlay_httpx._protocol._endpoint import Endpoint
from overlay_httpx._protocol._packet import TYPE_COOKIE

C_ADDR = ("10.0.0.3", 6000)
LIMIT = 20


def _initiations(target: Endpoint, count: int) -> list[bytes]:
    """Valid initiations from `count` fresh keys: they pass mac1 and cost a DH each."""
    out = []
    for i in range(count):
        attacker = Endpoint(Identity.generate(), Address(1, 1000 + i), timestamp_origin_ns=1)
        attacker.connect(target.public, B_ADDR, 0.0)
        [(init, _)] = attacker.datagrams_to_send(0.0)
        out.append(init)
    return out


def test_a_flood_of_initiations_gets_cookies_and_the_established_tunnel_keeps_working() -> None:
    config = TunnelConfig(handshake_rate_limit=LIMIT)
    net, a, b = make_pair(config=config)
    echo_round_trip(net, a, b)
    flood = _initiations(b.endpoint, 300)
    for i, init in enumerate(flood):  # many source ports and hosts
        b.endpoint.receive_datagram(init, (f"10.66.{i // 200}.{i % 200}", 20000 + i), net.now)
    replies = b.endpoint.datagrams_to_send(net.now)
    drops = b.endpoint.drops
    answered = len(flood) - drops.get("cookie_required", 0)
    assert answered <= LIMIT // 10  # at one instant only the burst: the work is spread out
    assert b.endpoint.cookies.handshakes_computed == answered + 1  # and a's, before
    assert drops["cookie_required"] >= len(flood) - LIMIT
    cookies = [d for d, _ in replies if d[0] == TYPE_COOKIE]
    assert len(cookies) == drops["cookie_required"]
    assert all(len(c) < len(flood[0]) for c in cookies)  # no amplification
    assert len(b.endpoint.tunnels()) <= LIMIT + 1
    # Tunnels that only answered a stranger's handshake stay out of every flush and timer.
    assert list(b.endpoint._live) == [a.endpoint.public.x25519]
    net.run_for(1.0)  # a second later the budget has refilled: another 20 were answered
    for i, init in enumerate(_initiations(b.endpoint, 100)):
        b.endpoint.receive_datagram(init, (f"10.67.0.{i}", 20000 + i), net.now)
    assert b.endpoint.cookies.handshakes_computed <= 1 + LIMIT + LIMIT // 10
    echo_round_trip(net, a, b, 50_000)  # the established tunnel still serves
    # Answered-but-never-confirmed handshakes are forgotten after the handshake timeout.
    net.run_for(config.handshake_timeout + 2.0)
    assert [t.peer for t in b.endpoint.tunnels()] == [a.endpoint.public.x25519]
    assert len(b.endpoint._accepted_timestamps) == 1


def test_a_legitimate_newcomer_under_load_proves_its_address_with_the_cookie() -> None:
    config = TunnelConfig(handshake_rate_limit=LIMIT)
    net, _, b = make_pair(config=config)
    c = App(Endpoint(Identity.generate(), Address(1, 3), config=config, timestamp_origin_ns=1))
    net.add(c, C_ADDR)
    for init in _initiations(b.endpoint, LIMIT + 5):  # b is now under load
        b.endpoint.receive_datagram(init, ("10.66.0.1", 30000), net.now)
    b.endpoint.datagrams_to_send(net.now)
    tunnel = c.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    sid = tunnel.open_stream(80, net.now)
    c.write(tunnel, sid, b"let me in", fin=True)
    st = c.state(tunnel, sid)
    assert net.run(until=lambda: st.eof, timeout=10)
    assert bytes(st.received) == b"let me in"
    assert net.now < 0.2  # one extra round trip for the cookie, no retry timer
    assert b.endpoint.drops["cookie_required"] >= 6


def test_a_spoofed_cookie_reply_is_ignored() -> None:
    net, a, b = make_pair()
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    [(init, _)] = a.endpoint.datagrams_to_send(net.now)
    index = int.from_bytes(init[4:8], "big")
    forged = bytes([TYPE_COOKIE, 0, 0, 0]) + index.to_bytes(4, "big") + bytes(12 + 32)
    a.endpoint.receive_datagram(forged, B_ADDR, net.now)
    assert a.endpoint.drops["auth_failure"] == 1
    assert tunnel._cookie is None
