from __future__ import annotations

import time

import pytest

from overlay_httpx.testing import LinkConfig, Network, TraceEntry, VirtualClock

A = ("10.0.0.1", 1000)
B = ("10.0.0.2", 2000)
A2 = ("192.0.2.7", 40000)
NOWHERE = ("10.9.9.9", 9)


class Echo:
    """Answers ``ping…`` with ``pong…``; every `period` may send `tick_payload` to `peer`."""

    def __init__(
        self,
        period: float | None = None,
        *,
        peer: tuple[str, int] | None = None,
        tick_payload: bytes = b"tick",
        stop_after: float | None = None,
    ) -> None:
        self.period = period
        self.peer = peer
        self.tick_payload = tick_payload
        self.stop_after = stop_after
        self.next_tick = period
        self.tick_times: list[float] = []
        self.received: list[tuple[float, bytes, tuple[str, int]]] = []
        self.outbox: list[tuple[bytes, tuple[str, int]]] = []

    def send(self, data: bytes, dst: tuple[str, int]) -> None:
        self.outbox.append((data, dst))

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        self.received.append((now, data, addr))
        if data.startswith(b"ping"):
            self.outbox.append((b"pong" + data[4:], addr))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        out, self.outbox = self.outbox, []
        return out

    def get_timer(self) -> float | None:
        return self.next_tick

    def handle_timer(self, now: float) -> None:
        assert self.next_tick is not None
        assert self.period is not None
        if now < self.next_tick:
            return
        self.tick_times.append(now)
        if self.peer is not None:
            self.outbox.append((self.tick_payload + str(len(self.tick_times)).encode(), self.peer))
        self.next_tick += self.period
        if self.stop_after is not None and self.next_tick > self.stop_after:
            self.next_tick = None

    def payloads(self) -> list[bytes]:
        return [data for _, data, _ in self.received]


class BusyLoop(Echo):
    """A buggy endpoint: its timer is always already due and firing it changes nothing."""

    def get_timer(self) -> float | None:
        return 0.0

    def handle_timer(self, now: float) -> None:
        pass

    def __repr__(self) -> str:
        return "<BusyLoop endpoint>"


def pair(
    *, seed: int = 0, link: LinkConfig | None = None, record: bool = False
) -> tuple[Network, Echo, Echo]:
    net = Network(seed=seed, link=link, record=record)
    a, b = Echo(), Echo()
    net.add(a, A)
    net.add(b, B)
    return net, a, b


def test_delay_gives_exact_arrival_times() -> None:
    net, a, b = pair(link=LinkConfig(delay=0.05))
    a.send(b"ping1", B)
    assert net.run() is True
    assert b.received == [(0.05, b"ping1", A)]
    assert a.received == [(0.1, b"pong1", B)]
    assert net.now == 0.1
    stats = net.statistics()
    assert (stats.sent, stats.delivered, stats.bytes_delivered, stats.dropped) == (2, 2, 10, 0)
    assert net.statistics_for(A, B).delivered == 1
    assert net.statistics_for(B, NOWHERE).sent == 0


def test_jitter_stays_within_bounds() -> None:
    net, a, b = pair(link=LinkConfig(delay=0.01, jitter=0.02))
    for i in range(200):
        a.send(b"x%d" % i, B)
    net.run()
    times = [t for t, _, _ in b.received]
    assert all(0.01 <= t <= 0.03 for t in times)
    assert len(set(times)) > 100


def lossy_run(seed: int) -> tuple[Network, Echo, Echo]:
    net, a, b = pair(seed=seed, record=True)
    net.set_link(A, B, LinkConfig(loss=0.1, delay=0.001))
    for i in range(10_000):
        a.send(b"ping%d" % i, B)
    assert net.run() is True
    return net, a, b


def test_loss_rate_and_determinism() -> None:
    net1, _, b1 = lossy_run(seed=7)
    stats = net1.statistics_for(A, B)
    assert stats.sent == 10_000
    assert stats.dropped_loss + stats.delivered == 10_000
    # 10% loss of 10 000: sigma = 30, allow 5 sigma.
    assert 850 <= stats.dropped_loss <= 1150
    assert net1.statistics_for(B, A).dropped_loss == 0
    assert len(b1.received) == stats.delivered

    net2, _, b2 = lossy_run(seed=7)
    assert net2.trace() == net1.trace()
    assert b2.received == b1.received

    net3, _, b3 = lossy_run(seed=8)
    assert net3.trace() != net1.trace()
    assert b3.payloads() != b1.payloads()


def test_duplication() -> None:
    net, a, b = pair(link=LinkConfig(delay=0.01, duplicate=1.0, duplicate_delay=0.002))
    net.set_link(B, A, LinkConfig(delay=0.01))
    a.send(b"ping", B)
    net.run()
    assert b.received == [(0.01, b"ping", A), (0.012, b"ping", A)]
    assert len(a.received) == 2
    stats = net.statistics()
    assert (stats.sent, stats.duplicated, stats.delivered) == (3, 1, 4)


def test_reordering_lets_later_datagrams_overtake() -> None:
    net = Network(seed=3, link=LinkConfig(delay=0.01, reorder=0.2, reorder_delay=0.005))
    sender, receiver = Echo(0.001, peer=B, stop_after=0.2005), Echo()
    net.add(sender, A)
    net.add(receiver, B)
    net.run()
    numbers = [int(p[4:]) for p in receiver.payloads()]
    assert sorted(numbers) == list(range(1, 201))
    assert numbers != sorted(numbers)
    stats = net.statistics()
    assert 20 <= stats.reordered <= 60
    assert stats.delivered == 200


def test_bandwidth_serializes_datagrams() -> None:
    net, a, b = pair(link=LinkConfig(bandwidth=1_000_000, delay=0.02))
    for i in range(10):
        a.send(b"%04d" % i + bytes(1246), B)
    net.run_for(1.0)
    times = [t for t, _, _ in b.received]
    assert times == pytest.approx([0.02 + 0.01 * k for k in range(1, 11)])
    assert [p[:4] for p in b.payloads()] == [b"%04d" % i for i in range(10)]


def test_drop_tail_queue_limit() -> None:
    config = LinkConfig(bandwidth=1_000_000, queue_bytes=5000)
    net, a, b = pair(link=config)
    for _ in range(10):
        a.send(bytes(1250), B)
    net.run_for(0.1)
    stats = net.statistics_for(A, B)
    assert (stats.delivered, stats.dropped_queue) == (4, 6)
    # Once the queue has drained the link accepts a full queue again.
    for _ in range(5):
        a.send(bytes(1250), B)
    net.run_for(0.1)
    assert net.statistics_for(A, B).delivered == 8
    assert [t for t, _, _ in b.received][4:] == pytest.approx([0.11, 0.12, 0.13, 0.14])


def test_mtu_drops_oversized_datagrams() -> None:
    net, a, b = pair(link=LinkConfig(mtu=1200))
    a.send(bytes(1200), B)
    a.send(bytes(1201), B)
    net.run()
    assert [len(p) for p in b.payloads()] == [1200]
    assert net.statistics().dropped_mtu == 1


def test_unreachable_destination_is_counted() -> None:
    net, a, _ = pair()
    a.send(b"hello", NOWHERE)
    assert net.run() is True
    assert net.statistics().dropped_unreachable == 1


def test_rebind() -> None:
    net, a, b = pair(link=LinkConfig(delay=0.05))
    net.set_link(A, B, LinkConfig(delay=0.03))
    a.send(b"ping1", B)
    net.run_for(0.05)  # ping arrived at 0.03; pong left B then, due at A at 0.08
    assert b.received == [(0.03, b"ping1", A)]
    net.rebind(A, A2)
    net.run()
    assert a.received == []
    assert net.statistics().dropped_rebind == 1
    assert net.statistics_for(B, A).dropped_rebind == 1

    a.send(b"ping2", B)
    start = net.now
    net.run()
    # The peer sees the new source address; the A->B link kept its 30 ms config.
    assert b.received[-1][1:] == (b"ping2", A2)
    assert b.received[-1][0] == pytest.approx(start + 0.03)
    assert [(data, src) for _, data, src in a.received] == [(b"pong2", B)]
    assert a.received[0][0] == pytest.approx(start + 0.08)
    b.send(b"late", A)
    net.run()
    assert net.statistics().dropped_unreachable == 1
    with pytest.raises(ValueError, match="no endpoint"):
        net.rebind(A, ("1.1.1.1", 1))
    with pytest.raises(ValueError, match="already taken"):
        net.rebind(A2, B)


def test_partition_blocks_both_ways_including_in_flight() -> None:
    net, a, b = pair(link=LinkConfig(delay=0.1))
    a.send(b"ping1", B)
    net.run_for(0.05)
    net.partition(A, B)
    b.send(b"hello", A)
    net.run()
    assert a.received == []
    assert b.received == []
    assert net.statistics().dropped_partition == 2
    net.partition(B, A, blocked=False)
    a.send(b"ping2", B)
    net.run()
    assert b.payloads() == [b"ping2"]
    assert a.payloads() == [b"pong2"]


def test_run_until() -> None:
    net = Network(link=LinkConfig(delay=0.01))
    ticker, b = Echo(1.0, peer=B), Echo()
    net.add(ticker, A)
    net.add(b, B)
    assert net.run(until=lambda: len(b.received) >= 3) is True
    assert net.now == 3.01
    assert net.run(until=lambda: False, timeout=10.0) is False
    assert net.now == 13.01
    assert len(ticker.tick_times) == 13

    idle, c, _ = pair()
    assert idle.run(until=lambda: bool(c.received)) is False  # nothing to do, never true
    c.send(b"ping", B)
    assert idle.run(until=lambda: bool(c.received)) is True
    assert idle.run(until=lambda: True) is True


def test_long_idle_period_is_fast() -> None:
    net = Network(link=LinkConfig(delay=0.02))
    keepalive, b = Echo(30.0, peer=B), Echo()
    net.add(keepalive, A)
    net.add(b, B)
    started = time.perf_counter()
    net.run_for(600.0)
    assert time.perf_counter() - started < 0.5
    assert len(keepalive.tick_times) == 20
    assert keepalive.tick_times == [30.0 * k for k in range(1, 21)]
    assert net.now == 600.0
    assert len(b.received) == 19  # the one sent at 600 s is still in flight
    assert net.in_flight == 1


def test_busy_loop_guard() -> None:
    net = Network()
    net.add(BusyLoop(), A)
    with pytest.raises(RuntimeError, match=r"BusyLoop endpoint.*busy loop"):
        net.run()


def test_timer_in_the_past_fires_at_current_time() -> None:
    clock = VirtualClock(100.0)
    net = Network(clock=clock)
    late = Echo(5.0, stop_after=5.0)
    net.add(late, A)
    net.run()
    assert late.tick_times == [100.0]


def test_max_events() -> None:
    net = Network()
    net.add(Echo(1.0), A)
    with pytest.raises(RuntimeError, match="max_events"):
        net.run(timeout=1000.0, max_events=10)


def test_trace_and_datagrams_between() -> None:
    net = Network(record=True, link=LinkConfig(delay=0.5))
    sender, b = Echo(1.0, peer=B, stop_after=5.0), Echo()
    net.add(sender, A)
    net.add(b, B)
    net.run()
    assert net.datagrams_between(0.0) == 5
    assert net.datagrams_between(2.0, 4.0) == 2
    assert net.datagrams_between(5.0 + 1e-9) == 0
    assert net.datagrams_between(0.0, dst=A) == 0
    trace = net.trace()
    assert trace[0] == TraceEntry(1.0, A, B, 5, "sent")
    assert trace[1] == TraceEntry(1.5, A, B, 5, "delivered")
    with pytest.raises(RuntimeError, match="record=True"):
        Network().trace()


def test_statistics_balance_under_mixed_impairments() -> None:
    config = LinkConfig(
        loss=0.05,
        duplicate=0.05,
        reorder=0.1,
        delay=0.01,
        jitter=0.005,
        bandwidth=100_000,
        queue_bytes=300,
    )
    net = Network(seed=11, link=config)
    a, b = Echo(0.0005, peer=B, tick_payload=b"ping", stop_after=2.0), Echo()
    net.add(a, A)
    net.add(b, B)
    net.run_for(1.0)
    s = net.statistics()
    assert s.sent + s.duplicated == s.delivered + s.dropped + net.in_flight
    assert min(s.dropped_loss, s.duplicated, s.reordered, s.dropped_queue) > 0


def test_many_datagrams_are_fast() -> None:
    net, a, _ = pair(link=LinkConfig(delay=0.01, bandwidth=100e6))
    for i in range(100_000):
        a.send(b"ping%d" % i, B)
    started = time.perf_counter()
    net.run()
    elapsed = time.perf_counter() - started
    assert net.statistics().delivered == 200_000
    assert elapsed < 10.0


def test_validation() -> None:
    with pytest.raises(ValueError, match="loss"):
        LinkConfig(loss=1.5)
    with pytest.raises(ValueError, match="reorder"):
        LinkConfig(reorder=-0.1)
    with pytest.raises(ValueError, match="delay"):
        LinkConfig(delay=-1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        LinkConfig(bandwidth=0)
    with pytest.raises(ValueError, match="queue_bytes"):
        LinkConfig(queue_bytes=1000)
    with pytest.raises(ValueError, match="mtu"):
        LinkConfig(mtu=0)
    clock = VirtualClock(5.0)
    clock.advance_to(5.0)
    with pytest.raises(ValueError, match="backwards"):
        clock.advance_to(4.0)
    net = Network(clock=clock)
    assert net.now == 5.0
    echo = Echo()
    net.add(echo, A)
    with pytest.raises(ValueError, match="already taken"):
        net.add(Echo(), A)
    with pytest.raises(ValueError, match="already attached"):
        net.add(echo, B)
    with pytest.raises(ValueError, match="duration"):
        net.run_for(-1.0)
