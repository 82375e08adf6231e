"""Relay datagrams, path upgrades, refusals, deferred trust, network keys and identify,
on the in-memory network with the virtual clock."""

from __future__ import annotations

import hashlib
import os

from _harness import A_ADDR, B_ADDR, App, established, payload

from overlay_httpx import Address, Identity
from overlay_httpx._protocol._endpoint import Endpoint
from overlay_httpx._protocol._events import HandshakeCompleted, HandshakeFailed, PathChanged
from overlay_httpx._protocol._packet import (
    IdentifyAnswer,
    identify_request,
    punch_datagram,
    relay_addr,
    relay_unwrap,
    relay_wrap,
)
from overlay_httpx.testing import Network

R_ADDR = ("10.0.0.9", 9000)


class MiniRelay:
    """The relay half of a rendezvous: forwards RELAY datagrams between known endpoints."""

    def __init__(self, table: dict[Address, tuple[str, int]]) -> None:
        self.table = table
        self.by_addr = {v: k for k, v in table.items()}
        self.out: list[tuple[bytes, tuple[str, int]]] = []
        self.forwarded = 0

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        source = self.by_addr.get(addr)
        unwrapped = relay_unwrap(data)
        if source is None or unwrapped is None or unwrapped[0] not in self.table:
            return
        destination, inner = unwrapped
        self.forwarded += 1
        self.out.append((relay_wrap(source, inner), self.table[destination]))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        out, self.out = self.out, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        return None


def _endpoint(n: int, **kw: object) -> Endpoint:
    return Endpoint(Identity.generate(), Address(1, n), timestamp_origin_ns=10**18, **kw)  # type: ignore[arg-type]


def _relayed_pair(seed: int = 1) -> tuple[Network, App, App, MiniRelay]:
    net = Network(seed=seed)
    a, b = App(_endpoint(1)), App(_endpoint(2), echo=True)
    b.endpoint.listen(80)
    for app in (a, b):
        app.endpoint.relay = R_ADDR
    relay = MiniRelay({a.endpoint.address: A_ADDR, b.endpoint.address: B_ADDR})
    net.add(a, A_ADDR)
    net.add(b, B_ADDR)
    net.add(relay, R_ADDR)
    net.partition(A_ADDR, B_ADDR)  # no direct path
    return net, a, b, relay


def test_tunnel_through_the_relay_carries_a_stream_end_to_end() -> None:
    net, a, b, relay = _relayed_pair()
    tunnel = a.endpoint.connect(b.endpoint.public, relay_addr(b.endpoint.address), net.now)
    sid = tunnel.open_stream(80, net.now)
    data = payload(300_000)
    a.write(tunnel, sid, data, fin=True)
    st = a.state(tunnel, sid)
    assert net.run(until=lambda: st.eof, timeout=60)
    assert hashlib.sha256(st.received).digest() == hashlib.sha256(data).digest()
    assert relay.forwarded > 200
    assert tunnel.is_relayed
    assert tunnel.statistics().path == "relayed"
    peer_tunnel = b.endpoint.tunnel(a.endpoint.public)
    assert peer_tunnel is not None
    assert peer_tunnel.is_relayed
    # The relay only ever saw ciphertext: the payload's bytes never appear in what it forwarded.
    assert b.of(HandshakeCompleted)[0].address == a.endpoint.address


def test_probe_moves_a_relayed_tunnel_to_the_direct_path_and_stragglers_do_not_move_it_back() -> (
    None
):
    net, a, b, relay = _relayed_pair(seed=2)
    tunnel = a.endpoint.connect(b.endpoint.public, relay_addr(b.endpoint.address), net.now)
    sid = tunnel.open_stream(80, net.now)
    a.write(tunnel, sid, b"x" * 1000)
    assert net.run(until=lambda: len(a.state(tunnel, sid).received) == 1000, timeout=30)
    tunnel.probe_path(B_ADDR)  # still partitioned: nothing changes
    net.run_for(2.0)
    assert tunnel.is_relayed
    net.partition(A_ADDR, B_ADDR, blocked=False)  # the NATs opened
    tunnel.probe_path(B_ADDR)
    assert net.run(until=lambda: bool(a.of(PathChanged)), timeout=10)
    assert tunnel.remote_addr == B_ADDR
    assert not tunnel.is_relayed
    peer_tunnel = b.endpoint.tunnel(a.endpoint.public)
    assert peer_tunnel is not None
    assert net.run(until=lambda: not peer_tunnel.is_relayed, timeout=10)
    before = relay.forwarded
    a.write(tunnel, sid, b"y" * 50_000, fin=True)
    st = a.state(tunnel, sid)
    assert net.run(until=lambda: st.eof, timeout=30)
    assert len(st.received) == 51_000
    assert not tunnel.is_relayed
    assert not peer_tunnel.is_relayed
    assert relay.forwarded - before <= 2  # at most stragglers already on their way


def test_relayed_datagram_from_anyone_but_the_relay_is_dropped() -> None:
    _net, a, b, _relay = _relayed_pair()
    forged = relay_wrap(a.endpoint.address, b"\x01" + bytes(200))
    b.endpoint.receive_datagram(forged, ("10.6.6.6", 1), 0.0)
    b.endpoint.receive_datagram(relay_wrap(a.endpoint.address, forged), R_ADDR, 0.0)  # nested
    assert b.endpoint.drops["bad_relay"] == 2


def test_refused_initiator_learns_it_in_one_round_trip_and_the_responder_keeps_nothing() -> None:
    net = Network(seed=4)
    a = App(_endpoint(1))
    b = App(_endpoint(2, trust=lambda identity, address: False))
    b.endpoint.listen(80)
    net.add(a, A_ADDR)
    net.add(b, B_ADDR)
    a.endpoint.connect(b.endpoint.public, B_ADDR, net.now).open_stream(80, net.now)
    assert net.run(until=lambda: bool(a.of(HandshakeFailed)), timeout=10)
    failed = a.of(HandshakeFailed)[0]
    assert failed.refused
    assert "trust" in failed.reason
    assert b.endpoint.tunnels() == []
    assert not established(b)


def test_a_forged_refusal_changes_nothing() -> None:
    net = Network(seed=5)
    a, b = App(_endpoint(1)), App(_endpoint(2), echo=True)
    b.endpoint.listen(80)
    net.add(a, A_ADDR)
    net.add(b, B_ADDR)
    mallory = _endpoint(3, trust=lambda identity, address: False)
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    init = a.endpoint.datagrams_to_send(net.now)[0][0]
    # Mallory cannot answer for B: her refusal is keyed to her own static key.
    mallory.receive_datagram(init, A_ADDR, 0.0)
    assert mallory.drops.get("bad_mac") == 1
    sid = tunnel.open_stream(80, net.now)
    a.write(tunnel, sid, b"still fine", fin=True)
    assert net.run(until=lambda: a.state(tunnel, sid).eof, timeout=30)
    assert not a.of(HandshakeFailed)


def test_deferred_trust_drops_silently_and_admits_the_retry() -> None:
    verdicts: list[bool | None] = [None, None, True]
    net = Network(seed=6)
    a = App(_endpoint(1))
    b = App(_endpoint(2, trust=lambda identity, address: verdicts.pop(0)), echo=True)
    b.endpoint.listen(80)
    net.add(a, A_ADDR)
    net.add(b, B_ADDR)
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    sid = tunnel.open_stream(80, net.now)
    a.write(tunnel, sid, b"hello", fin=True)
    assert net.run(until=lambda: a.state(tunnel, sid).eof, timeout=10)
    assert b.endpoint.drops["trust_pending"] == 2
    assert net.now < 2.0


def _psk_pair(psk_a: bytes | None, psk_b: bytes | None) -> tuple[Network, App, App]:
    net = Network(seed=7)
    a = App(_endpoint(1, network_key=psk_a))
    b = App(_endpoint(2, network_key=psk_b), echo=True)
    b.endpoint.listen(80)
    net.add(a, A_ADDR)
    net.add(b, B_ADDR)
    return net, a, b


def test_members_of_a_network_key_complete_the_handshake() -> None:
    key = os.urandom(32)
    net, a, b = _psk_pair(key, key)
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    sid = tunnel.open_stream(80, net.now)
    a.write(tunnel, sid, b"member", fin=True)
    assert net.run(until=lambda: a.state(tunnel, sid).eof, timeout=10)
    assert bytes(a.state(tunnel, sid).received) == b"member"


def test_non_members_never_complete_a_handshake() -> None:
    for psk_a, psk_b in ((os.urandom(32), os.urandom(32)), (None, os.urandom(32))):
        net, a, b = _psk_pair(psk_a, psk_b)
        a.endpoint.connect(b.endpoint.public, B_ADDR, net.now).open_stream(80, net.now)
        assert net.run(until=lambda a=a: bool(a.of(HandshakeFailed)), timeout=30)  # type: ignore[misc]
        assert not established(a)
        assert not established(b)


def test_identify_is_answered_only_by_a_rendezvous_and_punches_are_dropped() -> None:
    quiet, loud = _endpoint(1), _endpoint(2)
    loud.answer_identify = True
    request = identify_request(b"12345678")
    quiet.receive_datagram(request, A_ADDR, 0.0)
    assert quiet.datagrams_to_send(0.0) == []
    loud.receive_datagram(request, A_ADDR, 0.0)
    [(answer_bytes, to)] = loud.datagrams_to_send(0.0)
    assert to == A_ADDR
    assert len(answer_bytes) <= len(request)
    answer = IdentifyAnswer.decode(answer_bytes)
    assert answer is not None
    assert answer.nonce == b"12345678"
    assert answer.x25519 == loud.public.x25519
    assert answer.address == loud.address
    quiet.receive_datagram(punch_datagram(), B_ADDR, 0.0)
    assert quiet.drops["punch"] == 1


def test_a_slow_response_to_a_retried_initiation_still_works_at_once() -> None:
    """The initiator retries before the first response arrives; the responder answers
    both and must accept whichever response the initiator kept."""
    from overlay_httpx.testing import LinkConfig

    net = Network(seed=8)
    a, b = App(_endpoint(1)), App(_endpoint(2), echo=True)
    b.endpoint.listen(80)
    net.add(a, A_ADDR)
    net.add(b, B_ADDR)
    net.set_link(B_ADDR, A_ADDR, LinkConfig(delay=0.4))  # longer than the 0.25 s retry
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    sid = tunnel.open_stream(80, net.now)
    a.write(tunnel, sid, b"hello", fin=True)
    assert net.run(until=lambda: a.state(tunnel, sid).eof, timeout=30)
    assert net.now < 1.5, f"took {net.now:.2f} s: the kept response's session was dropped"
    assert len(b.of(HandshakeCompleted)) == 1
