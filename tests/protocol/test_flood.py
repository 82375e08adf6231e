"""Handshake floods: stateless cookies, per-source limits and reaping of unconfirmed
handshakes keep the responder's work and memory bounded (virtual clock)."""

from __future__ import annotations

import struct

from _harness import B_ADDR, App, echo_round_trip, make_pair

from overlay_httpx import Address, Identity
from overlay_httpx._protocol._config import TunnelConfig
from overlay_httpx._protocol._endpoint import Endpoint
from overlay_httpx._protocol._packet import TYPE_COOKIE, TYPE_RESPONSE, DataHeader

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


def test_the_pending_cap_holds_against_forged_packets_to_the_answered_index() -> None:
    """A flooder learns our index from our RESPONSE; garbage sent to it must not count
    as the confirmation that would take its tunnel out of the pending count."""
    pending = 10
    config = TunnelConfig(handshake_rate_limit=1_000_000, max_pending_handshakes=pending)
    target = Endpoint(Identity.generate(), Address(1, 2), config=config, timestamp_origin_ns=1)
    kinds = []
    for i, init in enumerate(_initiations(target, 3 * pending)):
        source = (f"10.66.0.{i}", 20000 + i)
        target.receive_datagram(init, source, 0.0)
        [(reply, _)] = target.datagrams_to_send(0.0)
        kinds.append(reply[0])
        if reply[0] == TYPE_RESPONSE:
            index = struct.unpack_from("!I", reply, 4)[0]  # our sender index
            forged_data = DataHeader.pack(index, 0) + bytes(16)
            forged_cookie = bytes([TYPE_COOKIE, 0, 0, 0]) + index.to_bytes(4, "big") + bytes(44)
            target.receive_datagram(forged_data, source, 0.0)
            target.receive_datagram(forged_cookie, source, 0.0)
    assert kinds.count(TYPE_RESPONSE) == pending  # the cap held
    assert kinds.count(TYPE_COOKIE) == 2 * pending
    assert len(target._dormant) == pending
    assert not target._live  # and none of them joined the flushes


def test_a_source_proven_by_cookie_keeps_getting_in_over_a_long_flood() -> None:
    """The per-source bucket refills: one newcomer a minute from the same address,
    each with a valid mac2, all get in while the node stays under load."""
    config = TunnelConfig(handshake_rate_limit=LIMIT, max_pending_handshakes=3)
    net, _, b = make_pair(config=config)
    for init in _initiations(b.endpoint, 3):  # b holds 3 pending strangers: under load
        b.endpoint.receive_datagram(init, ("10.66.0.1", 30000), net.now)
    b.endpoint.datagrams_to_send(net.now)
    for i in range(13):  # more than the source bucket's burst of 10
        identity = Identity.generate()
        c = App(Endpoint(identity, Address(1, 100 + i), config=config, timestamp_origin_ns=1))
        net.add(c, (C_ADDR[0], C_ADDR[1] + i))  # the same IP address: the same source bucket
        tunnel = c.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
        sid = tunnel.open_stream(80, net.now)
        c.write(tunnel, sid, b"hello", fin=True)
        st = c.state(tunnel, sid)
        assert net.run(until=lambda st=st: st.eof, timeout=10), f"newcomer {i} kept out"
        tunnel.close(net.now)
        net.run_for(60.0)
        for init in _initiations(b.endpoint, 3):  # keep b under load
            b.endpoint.receive_datagram(init, ("10.66.0.1", 30000), net.now)
        b.endpoint.datagrams_to_send(net.now)
    assert b.endpoint.drops.get("handshake_rate_limited", 0) == 0
