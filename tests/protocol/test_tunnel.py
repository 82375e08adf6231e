"""Two endpoints over the deterministic network: handshake, transfer, loss, close."""

from __future__ import annotations

import hashlib

import pytest
from _build import patches_the_core
from _harness import (
    A_ADDR,
    B_ADDR,
    App,
    closed,
    echo_round_trip,
    established,
    make_pair,
    payload,
)

from overlay_httpx._protocol._config import TunnelConfig
from overlay_httpx._protocol._events import (
    ERROR_PORT_UNREACHABLE,
    HandshakeCompleted,
    HandshakeFailed,
    PathChanged,
    StreamMoved,
    StreamOpened,
    StreamReset,
    StreamStopSending,
    TunnelClosed,
)
from overlay_httpx._protocol._handshake import CONFIRM_DELAY
from overlay_httpx.testing import LinkConfig, Network


def _start(net: Network, a: App, b: App, data: bytes, port: int = 80) -> tuple[object, int]:
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    sid = tunnel.open_stream(port, net.now)
    a.write(tunnel, sid, data, fin=True)
    return tunnel, sid


def _echo_round_trip(net: Network, a: App, b: App, size: int, timeout: float = 600.0) -> None:
    data = payload(size)
    tunnel, sid = _start(net, a, b, data)
    st = a.state(tunnel, sid)  # type: ignore[arg-type]
    assert net.run(until=lambda: st.eof, timeout=timeout), (
        f"echo of {size} bytes did not finish; got {len(st.received)}"
    )
    assert hashlib.sha256(st.received).digest() == hashlib.sha256(data).digest()


def test_handshake_and_small_echo() -> None:
    net, a, b = make_pair()
    _echo_round_trip(net, a, b, 5)
    ha = a.of(HandshakeCompleted)[0]
    hb = b.of(HandshakeCompleted)[0]
    assert ha.address == b.endpoint.address
    assert hb.address == a.endpoint.address
    assert hb.identity == a.endpoint.public
    assert ha.identity == b.endpoint.public


def test_empty_stream_round_trip() -> None:
    net, a, b = make_pair()
    _echo_round_trip(net, a, b, 0)


@pytest.mark.parametrize(
    ("loss", "seed"), [(0.0, 1), (0.02, 2), (0.10, 3), (0.25, 4)], ids=["0%", "2%", "10%", "25%"]
)
def test_10_mib_each_way_under_loss(loss: float, seed: int) -> None:
    link = LinkConfig(
        loss=loss,
        duplicate=0.01 if loss else 0.0,
        reorder=0.02 if loss else 0.0,
        delay=0.01,
        bandwidth=200e6,
        queue_bytes=2_000_000,
    )
    net, a, b = make_pair(seed=seed, link=link, config=TunnelConfig(max_datagram_size=1200))
    _echo_round_trip(net, a, b, 10 << 20, timeout=3600)


def test_refused_port_is_reset_with_reason() -> None:
    net, a, b = make_pair()
    _tunnel, _sid = _start(net, a, b, b"hello", port=81)
    assert net.run(until=lambda: bool(a.of(StreamReset)), timeout=10)
    reset = a.of(StreamReset)[0]
    assert reset.error_code == ERROR_PORT_UNREACHABLE
    assert reset.reason == "port unreachable"


def test_handshake_timeout_when_peer_absent() -> None:
    net, a, _ = make_pair()
    tunnel = a.endpoint.connect(
        a.endpoint.public.__class__.parse(str(_other_public())), ("10.9.9.9", 1), net.now
    )
    tunnel.open_stream(80, net.now)
    assert net.run(until=lambda: bool(a.of(HandshakeFailed)), timeout=30)
    assert 4.9 <= net.now <= 5.1
    assert "timed out" in a.of(HandshakeFailed)[0].reason


def _other_public():  # type: ignore[no-untyped-def]
    from overlay_httpx import Identity

    return Identity.generate().public


def _drop_matching(net: Network, predicate, count: int):  # type: ignore[no-untyped-def]
    """Wrap the network's send so that the first `count` datagrams matching are lost."""
    original = net._send
    state = {"left": count, "dropped": 0}

    def send(src, dst, data, now):  # type: ignore[no-untyped-def]
        if state["left"] > 0 and predicate(src, dst, data):
            state["left"] -= 1
            state["dropped"] += 1
            return
        original(src, dst, data, now)

    net._send = send  # type: ignore[method-assign]
    return state


def test_loss_of_handshake_response_is_recovered() -> None:
    net, a, b = make_pair()
    dropped = _drop_matching(net, lambda s, d, data: data[0] == 0x02, 2)
    _echo_round_trip(net, a, b, 1000)
    assert dropped["dropped"] == 2


def test_loss_of_last_data_packet_and_fin() -> None:
    # The responder's FIN-carrying datagrams (and what precedes them) get lost several times.
    net, a, b = make_pair()
    size = 50_000
    sent_fin = {"n": 0}

    def is_fin_packet(src, dst, data):  # type: ignore[no-untyped-def]
        # We cannot read ciphertext; drop the biggest tail: every data packet from B
        # once B has queued its FIN (the state flag of the harness tells us).
        st = next(iter(b.streams.values()), None)
        if src == B_ADDR and data[0] == 0x04 and st is not None and st.fin_queued:
            sent_fin["n"] += 1
            return True
        return False

    dropped = _drop_matching(net, is_fin_packet, 3)
    _echo_round_trip(net, a, b, size)
    assert dropped["dropped"] == 3


def test_all_acks_lost_for_a_while() -> None:
    net, a, b = make_pair(echo=False)
    # Every packet B sends for the first 0.3 s is an acknowledgement: lose them all.
    dropped = _drop_matching(
        net, lambda s, d, data: s == B_ADDR and data[0] == 0x04 and net.now < 0.3, 10_000
    )
    data = payload(300_000)
    _tunnel, _sid = _start(net, a, b, data)
    assert net.run(until=lambda: any(st.eof for st in b.streams.values()), timeout=60)
    (received,) = [bytes(st.received) for st in b.streams.values()]
    assert received == data
    assert dropped["dropped"] >= 4  # the sender stalls on its window: few ACKs exist


def test_no_close_storm() -> None:
    net, a, b = make_pair(record=True)
    _echo_round_trip(net, a, b, 10_000)
    tunnel_a = a.endpoint.tunnel(b.endpoint.public)
    tunnel_b = b.endpoint.tunnel(a.endpoint.public)
    assert tunnel_a is not None
    assert tunnel_b is not None
    net.run_for(1.0)
    t0 = net.now
    tunnel_a.close(net.now)
    tunnel_b.close(net.now)
    net.run_for(60.0)
    assert net.datagrams_between(t0, t0 + 60.0) <= 6
    assert closed(a)
    assert closed(b)
    assert a.endpoint.tunnels() == []  # forgotten after draining


def test_replaying_every_datagram_changes_nothing() -> None:
    net, a, b = make_pair(record=True)
    captured: list[tuple[tuple[str, int], tuple[str, int], bytes]] = []
    original = net._send

    def send(src, dst, data, now):  # type: ignore[no-untyped-def]
        captured.append((src, dst, data))
        original(src, dst, data, now)

    net._send = send  # type: ignore[method-assign]
    _echo_round_trip(net, a, b, 100_000)
    net.run_for(1.0)  # let the last acknowledgements land: what follows are pure replays
    received_before = {k: bytes(v.received) for k, v in a.streams.items()}
    events_before = (len(a.events), len(b.events))
    drops_before = b.endpoint.statistics().dropped + a.endpoint.statistics().dropped
    for src, dst, data in captured:
        target = a if dst == A_ADDR else b
        target.receive_datagram(data, src, net.now)
    assert {k: bytes(v.received) for k, v in a.streams.items()} == received_before
    assert (len(a.events), len(b.events)) == events_before
    dropped = b.endpoint.statistics().dropped + a.endpoint.statistics().dropped
    assert dropped - drops_before == len(captured)


def test_flipped_bits_are_dropped_and_counted() -> None:
    net, a, b = make_pair()
    samples: list[tuple[tuple[str, int], bytes]] = []
    original = net._send

    def send(src, dst, data, now):  # type: ignore[no-untyped-def]
        if dst == B_ADDR and len(samples) < 12:
            samples.append((src, data))
        original(src, dst, data, now)

    net._send = send  # type: ignore[method-assign]
    _echo_round_trip(net, a, b, 20_000)
    stats = b.endpoint.statistics()
    before = stats.dropped
    flips = 0
    for src, data in samples:
        for bit in range(0, len(data) * 8, 97):
            mutated = bytearray(data)
            mutated[bit // 8] ^= 1 << (bit % 8)
            b.receive_datagram(bytes(mutated), src, net.now)
            flips += 1
    after = b.endpoint.statistics()
    assert after.dropped - before == flips
    assert "internal_error" not in after.drops


def test_thousand_streams_opened_and_closed() -> None:
    net, a, b = make_pair()
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    sids = []
    for i in range(1000):
        sid = tunnel.open_stream(80, net.now)
        a.write(tunnel, sid, f"stream {i}".encode(), fin=True)
        sids.append(sid)
    states = [a.state(tunnel, sid) for sid in sids]
    assert net.run(until=lambda: all(s.eof for s in states), timeout=120)
    for i, st in enumerate(states):
        assert bytes(st.received) == f"stream {i}".encode()
    net.run_for(2.0)
    assert tunnel.stream_ids() == []
    tb = b.endpoint.tunnel(a.endpoint.public)
    assert tb is not None
    assert tb.stream_ids() == []


@pytest.mark.parametrize("persistent", [True, False])
def test_ten_idle_minutes(persistent: bool) -> None:
    cfg = TunnelConfig(persistent_keepalive=persistent)
    net, a, b = make_pair(config=cfg, record=True)
    _echo_round_trip(net, a, b, 100)
    t0 = net.now
    net.run_for(600.0)
    sent = net.datagrams_between(t0, t0 + 600.0)
    if persistent:
        assert not closed(a)
        assert not closed(b)
        # a PING (and its ACK) every 30 s, plus a rekey every 120 s: bounded chatter
        assert 20 <= sent <= 120
        _echo_round_trip(net, a, b, 100)  # still works after the idle period
    else:
        idle = [e for e in a.of(TunnelClosed)]
        assert idle
        assert idle[0].reason == "idle timeout"
        assert sent <= 10


def test_rekey_in_the_middle_of_a_transfer() -> None:
    cfg = TunnelConfig(rekey_after_time=0.5)
    link = LinkConfig(delay=0.01, bandwidth=100e6, queue_bytes=1_000_000)
    net, a, b = make_pair(config=cfg, link=link)
    _echo_round_trip(net, a, b, 10 << 20, timeout=600)
    tunnel = a.endpoint.tunnel(b.endpoint.public)
    assert tunnel is not None
    assert (
        tunnel.statistics().rekeys
        + (
            b.endpoint.tunnel(a.endpoint.public).statistics().rekeys  # type: ignore[union-attr]
        )
        >= 2
    )


def test_nat_rebinding_in_the_middle_of_a_transfer() -> None:
    link = LinkConfig(delay=0.005, bandwidth=100e6, queue_bytes=1_000_000)
    net, a, b = make_pair(link=link)
    data = payload(10 << 20)
    tunnel, sid = _start(net, a, b, data)
    st = a.state(tunnel, sid)  # type: ignore[arg-type]
    net.run(until=lambda: len(st.received) > 3 << 20, timeout=600)
    new_addr = ("192.0.2.77", 31337)
    net.rebind(A_ADDR, new_addr)
    assert net.run(until=lambda: st.eof, timeout=600)
    assert hashlib.sha256(st.received).digest() == hashlib.sha256(data).digest()
    changed = b.of(PathChanged)
    assert changed
    assert changed[-1].new == new_addr


def test_peer_restart_resets_old_streams_and_new_ones_work() -> None:
    net, a, b = make_pair()
    _echo_round_trip(net, a, b, 1000)
    tunnel = a.endpoint.tunnel(b.endpoint.public)
    assert tunnel is not None
    # a long-lived stream that the restart will kill: the peer acknowledged it
    sid = tunnel.open_stream(80, net.now)
    a.write(tunnel, sid, b"before restart")
    net.run_for(1.0)
    # B restarts: same identity, fresh state, same UDP address
    from overlay_httpx._protocol._endpoint import Endpoint

    old = b.endpoint
    fresh = Endpoint(old.keys.identity, old.address, config=old.config, timestamp_origin_ns=10**18)
    fresh.listen(80)
    b.endpoint = fresh
    b.streams.clear()
    # A stream opened before A notices is sent under the dead session. The
    # restarted peer never saw it, so once the probe timeouts trigger a new
    # handshake it is replayed on the new connection and simply succeeds.
    late = tunnel.open_stream(80, net.now)
    a.write(tunnel, late, b"sent into the void", fin=True)
    state = a.state(tunnel, late)
    assert net.run(until=lambda: state.eof, timeout=60)
    assert bytes(state.received) == b"sent into the void"
    assert state.reset is None
    restarted = [e for e in a.of(HandshakeCompleted) if e.peer_restarted]
    assert restarted
    (moved,) = a.of(StreamMoved)
    assert moved.old_stream_id == late
    resets = [e for e in a.of(StreamReset) if e.stream_id == sid]
    assert resets
    assert resets[0].reason == "peer restarted"
    assert [e for e in a.of(StreamReset) if e.reason == "peer restarted"] == resets
    assert net.now < 10  # detected within a few probe timeouts
    a.streams.clear()  # stream ids start over on the new connection
    _echo_round_trip(net, a, b, 5000)  # new streams just work


def test_stream_limit_raised_by_max_streams_survives_a_rekey() -> None:
    config = TunnelConfig(
        max_streams=4, rekey_after_time=1.0, keepalive=0.3, persistent_keepalive=True
    )
    net, a, b = make_pair(config=config)
    tunnel = a.endpoint.tunnel(b.endpoint.public) or a.endpoint.connect(
        b.endpoint.public, B_ADDR, net.now
    )
    for round_ in range(3):
        for _ in range(4):  # four more streams than the initial limit each round
            sid = tunnel.open_stream(80, net.now)
            a.write(tunnel, sid, b"x", fin=True)
            assert net.run(until=lambda sid=sid: a.state(tunnel, sid).eof, timeout=30)
        net.run_for(1.5)  # at least one rekey; its hello repeats max_streams=4
        assert tunnel.statistics().rekeys >= round_ + 1
    assert tunnel.is_established


def test_simultaneous_initiation_yields_one_session() -> None:
    net, a, b = make_pair(echo=False)
    b.endpoint.listen(80)
    a.endpoint.listen(80)
    ta = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    tb = b.endpoint.connect(a.endpoint.public, A_ADDR, net.now)
    sa = ta.open_stream(80, net.now)
    sb = tb.open_stream(80, net.now)
    a.write(ta, sa, b"from a", fin=True)
    b.write(tb, sb, b"from b", fin=True)
    assert net.run(
        until=lambda: (
            any(s.eof for s in a.streams.values() if s is not a.state(ta, sa))
            and any(s.eof for s in b.streams.values() if s is not b.state(tb, sb))
        ),
        timeout=30,
    )
    assert len(a.of(HandshakeCompleted)) == 1
    assert len(b.of(HandshakeCompleted)) == 1


def test_untrusted_initiator_gets_nowhere() -> None:
    from overlay_httpx import Address, Identity
    from overlay_httpx._protocol._endpoint import Endpoint

    net = Network(seed=3)
    a = App(Endpoint(Identity.generate(), Address(1, 1), timestamp_origin_ns=1))
    b = App(Endpoint(Identity.generate(), Address(1, 2), trust=lambda pub, addr: False))
    b.endpoint.listen(80)
    net.add(a, A_ADDR)
    net.add(b, B_ADDR)
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    tunnel.open_stream(80, net.now)
    assert net.run(until=lambda: bool(a.of(HandshakeFailed)), timeout=30)
    failed = a.of(HandshakeFailed)[0]
    assert failed.refused, failed  # an authenticated refusal, not a timeout
    assert net.now < 1.0
    assert b.endpoint.tunnels() == []
    assert b.endpoint.statistics().drops["untrusted"] == 1
    assert not established(b)


def test_restarted_initiator_is_reported_by_the_responder() -> None:
    from overlay_httpx._protocol._endpoint import Endpoint

    net, a, b = make_pair()
    _echo_round_trip(net, a, b, 1000)
    old = a.endpoint
    # A restarts (same identity, fresh state, later clock) and calls B again.
    a.endpoint = Endpoint(
        old.keys.identity, old.address, config=old.config, timestamp_origin_ns=2 * 10**18
    )
    a.streams.clear()
    b.streams.clear()  # stream ids start over on the new connection
    _echo_round_trip(net, a, b, 1000)
    completed = b.of(HandshakeCompleted)
    assert len(completed) == 2
    assert completed[-1].peer_restarted
    assert not completed[-1].rekey


def test_stop_sending_in_the_opening_packet_is_honoured() -> None:
    net, a, b = make_pair(echo=False)
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    assert net.run(until=lambda: established(a) and established(b), timeout=10)
    sid = tunnel.open_stream(80, net.now)
    tunnel.send_stream(sid, b"fire and forget", end_stream=True)
    tunnel.stop_sending(sid, 0x9)  # leaves in the same packet as the opening STREAM frame
    b_tunnel = b.endpoint.tunnel(a.endpoint.public)
    assert b_tunnel is not None
    # B reads the request, answers the STOP_SENDING with a reset, and both
    # sides forget the stream: nothing is left half-open.
    assert net.run(until=lambda: not b_tunnel.stream_ids() and not tunnel.stream_ids(), timeout=30)
    assert bytes(b.state(b_tunnel, sid).received) == b"fire and forget"
    # B's application hears of the stop right after the stream itself.
    told = [type(e) for e in b.events if getattr(e, "stream_id", None) == sid]
    assert told[:2] == [StreamOpened, StreamStopSending]


def test_a_restarted_peer_is_noticed_under_steady_traffic() -> None:
    """New requests keep arming the probe timer afresh, so probe timeouts alone never
    pile up; silence while data is outstanding must be enough to suspect a restart."""
    from overlay_httpx._protocol._endpoint import Endpoint

    net, a, b = make_pair()
    _echo_round_trip(net, a, b, 1000)
    tunnel = a.endpoint.tunnel(b.endpoint.public)
    assert tunnel is not None
    old = b.endpoint
    fresh = Endpoint(old.keys.identity, old.address, config=old.config, timestamp_origin_ns=10**18)
    fresh.listen(80)
    b.endpoint = fresh
    b.streams.clear()
    restart_at = net.now
    states = []
    for _ in range(60):  # a new small request every 50 ms for 3 s
        sid = tunnel.open_stream(80, net.now)
        a.write(tunnel, sid, b"request", fin=True)
        states.append(a.state(tunnel, sid))
        net.run_for(0.05)
    restarted = [e for e in a.of(HandshakeCompleted) if e.peer_restarted]
    assert restarted, "the restart went unnoticed while requests kept coming"
    assert net.run(until=lambda: all(s.eof for s in states[-10:]), timeout=10)
    assert net.now - restart_at < 6


def test_a_draining_tunnel_replaced_by_a_new_handshake_leaves_no_index_behind() -> None:
    net, a, b = make_pair()
    for _ in range(4):
        echo_round_trip(net, a, b)
        tunnel = a.endpoint.tunnel(b.endpoint.public)
        assert tunnel is not None
        tunnel.close(net.now)
        net.run_for(0.02)  # b has the CLOSE: its tunnel is closed and draining
        a.endpoint.handle_timer(net.now + 100)  # a forgets its side at once, then reconnects
        a.endpoint.datagrams_to_send(net.now + 100)
        live = {id(t) for t in b.endpoint.tunnels()}
        assert all(id(t) in live for t in b.endpoint._indexes.values())


def test_a_request_sent_on_connect_confirms_the_keys_without_a_ping() -> None:
    """A node's connect returns when the handshake completes, and the request follows:
    that request confirms the keys, so one datagram crosses each way after the handshake."""
    net, a, b = make_pair()
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    assert net.run(until=lambda: established(a), timeout=5)
    sid = tunnel.open_stream(80, net.now)
    a.write(tunnel, sid, b"request", fin=True)
    st = a.state(tunnel, sid)
    assert net.run(until=lambda: st.eof, timeout=5)
    assert st.received == b"request"
    a_to_b = net.statistics_for(A_ADDR, B_ADDR).sent
    b_to_a = net.statistics_for(B_ADDR, A_ADDR).sent
    # INIT, the request (with FIN); RESPONSE, the echo (with FIN, and the ACK of the
    # request). A PING for the keys would make it 3 and 3: two ack-eliciting packets
    # call for an ACK at once.
    assert (a_to_b, b_to_a) == (2, 2)


def test_a_connect_with_nothing_to_send_confirms_the_keys_with_a_ping_soon_after() -> None:
    net, a, b = make_pair(link=LinkConfig(delay=0.005))
    a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    assert net.run(until=lambda: established(a), timeout=5)
    completed_at = net.now
    assert b.endpoint.tunnel(a.endpoint.public).awaiting_confirmation  # type: ignore[union-attr]
    assert net.run(until=lambda: established(b), timeout=5)
    assert net.now == pytest.approx(completed_at + CONFIRM_DELAY + 0.005)


def test_the_confirming_ping_is_resent_when_lost() -> None:
    net, a, b = make_pair(link=LinkConfig(delay=0.005))
    a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    assert net.run(until=lambda: established(a), timeout=5)
    net.partition(A_ADDR, B_ADDR)
    net.run_for(CONFIRM_DELAY * 2)  # the PING is lost
    net.partition(A_ADDR, B_ADDR, blocked=False)
    assert net.run(until=lambda: established(b), timeout=5)
    tunnel = b.endpoint.tunnel(a.endpoint.public)
    assert tunnel is not None
    assert tunnel.is_established


@patches_the_core
def test_the_confirming_ping_goes_out_through_a_full_congestion_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keys are confirmed even when the window is full (of packets to a session the peer
    may have forgotten): the PING is a probe, which the window does not hold back."""
    net, a, b = make_pair(link=LinkConfig(delay=0.005))
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    full = type(tunnel._conn._congestion)
    monkeypatch.setattr(full, "can_send", lambda self, size: False)  # every window full
    assert net.run(until=lambda: established(a), timeout=5)
    completed_at = net.now
    assert net.run(until=lambda: established(b), timeout=5)
    assert net.now == pytest.approx(completed_at + CONFIRM_DELAY + 0.005)
