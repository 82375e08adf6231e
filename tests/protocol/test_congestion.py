"""NewReno and the pacer, driven with explicit times and hand-built packets."""

from __future__ import annotations

import itertools

import pytest

from overlay_httpx._protocol._congestion import CongestionController, NewReno, Pacer
from overlay_httpx._protocol._recovery import SentPacket

MDS = 1200


def _packets(first: int, count: int, t: float, size: int = MDS) -> list[SentPacket]:
    return [SentPacket(first + i, t, size, True, True) for i in range(count)]


def _send(cc: NewReno, packets: list[SentPacket]) -> None:
    for p in packets:
        cc.on_packet_sent(p.size, p.time_sent)


def _fill_window(cc: NewReno, first: int, t: float) -> list[SentPacket]:
    """Send full-size packets until the window is full, as a cwnd-limited sender does."""
    out: list[SentPacket] = []
    while cc.can_send(MDS):
        p = SentPacket(first + len(out), t, MDS, True, True)
        cc.on_packet_sent(p.size, t)
        out.append(p)
    return out


def test_newreno_satisfies_the_protocol() -> None:
    cc: CongestionController = NewReno()
    assert cc.congestion_window == 12000


@pytest.mark.parametrize(
    ("mds", "initial", "minimum"),
    [(1200, 12000, 2400), (1500, 14720, 3000), (1000, 10000, 2000), (9000, 18000, 18000)],
)
def test_initial_and_minimum_window(mds: int, initial: int, minimum: int) -> None:
    cc = NewReno(max_datagram_size=mds)
    assert cc.congestion_window == cc.initial_window == initial
    assert cc.minimum_window == minimum
    assert cc.ssthresh is None
    assert cc.in_slow_start
    assert cc.recovery_start_time is None


def test_explicit_windows_and_validation() -> None:
    cc = NewReno(initial_window=50_000, minimum_window=5000)
    assert (cc.congestion_window, cc.minimum_window) == (50_000, 5000)
    with pytest.raises(ValueError, match="max_datagram_size"):
        NewReno(max_datagram_size=0)
    with pytest.raises(ValueError, match="below minimum_window"):
        NewReno(initial_window=1000, minimum_window=2400)


def test_can_send_counts_bytes_in_flight() -> None:
    cc = NewReno()
    assert cc.can_send(12000)
    assert not cc.can_send(12001)
    _send(cc, _packets(0, 9, 0.0))
    assert cc.bytes_in_flight == 10800
    assert cc.can_send(1200)
    assert not cc.can_send(1201)
    cc.on_packet_sent(1200, 0.0)
    assert not cc.can_send(1)


def test_slow_start_doubles_per_round_trip() -> None:
    cc = NewReno()
    t, pn = 0.0, 0
    for expected in (24000, 48000, 96000):
        flight = _fill_window(cc, pn, t)
        pn += len(flight)
        t += 0.1
        cc.on_packets_acked(flight, t)
        assert cc.congestion_window == expected
        assert cc.bytes_in_flight == 0
    assert cc.in_slow_start


def test_slow_start_per_ack_with_refill() -> None:
    # Acks one at a time, refilling the window after each: still doubles per RTT.
    cc = NewReno()
    round_ = _fill_window(cc, 0, 0.0)
    pn = len(round_)
    next_round: list[SentPacket] = []
    for p in round_:
        cc.on_packets_acked([p], 0.1)
        sent = _fill_window(cc, pn, 0.1)
        pn += len(sent)
        next_round += sent
    assert cc.congestion_window == 24000
    assert len(next_round) == 20


def test_non_in_flight_packets_are_ignored() -> None:
    cc = NewReno()
    ack_only = SentPacket(0, 0.0, 50, False, False)
    cc.on_packets_acked([ack_only], 0.1)
    cc.on_packets_lost([ack_only], 0.1)
    assert cc.congestion_window == 12000
    assert cc.recovery_start_time is None
    assert cc.bytes_in_flight == 0


def _enter_recovery(cc: NewReno, now: float) -> None:
    lost = _packets(1000, 1, now - 0.05)
    _send(cc, lost)
    cc.on_packets_lost(lost, now)


def test_loss_halves_window_and_sets_ssthresh() -> None:
    cc = NewReno()
    _enter_recovery(cc, 1.0)
    assert cc.ssthresh == 6000
    assert cc.congestion_window == 6000
    assert cc.recovery_start_time == 1.0
    assert not cc.in_slow_start
    assert cc.in_recovery(1.0)
    assert not cc.in_recovery(1.0001)
    assert cc.bytes_in_flight == 0


def test_loss_reduction_never_goes_below_minimum() -> None:
    cc = NewReno(initial_window=3000, minimum_window=2400)
    _enter_recovery(cc, 1.0)
    assert cc.ssthresh == 1500
    assert cc.congestion_window == 2400


def test_several_losses_in_one_recovery_period_reduce_once() -> None:
    cc = NewReno()
    early = _packets(0, 6, 0.0)
    _send(cc, early)
    cc.on_packets_lost(early[:2], 0.2)
    assert cc.congestion_window == 6000
    cc.on_packets_lost(early[2:4], 0.25)
    cc.on_packets_lost(early[4:], 0.3)
    assert cc.congestion_window == 6000
    assert cc.recovery_start_time == 0.2
    assert cc.bytes_in_flight == 0


def test_loss_of_packet_sent_after_recovery_start_reduces_again() -> None:
    cc = NewReno()
    _enter_recovery(cc, 1.0)
    assert cc.congestion_window == 6000
    later = _packets(10, 1, 1.01)
    _send(cc, later)
    cc.on_packets_lost(later, 1.2)
    assert cc.congestion_window == 3000
    assert cc.ssthresh == 3000
    assert cc.recovery_start_time == 1.2


def test_acks_of_packets_sent_before_recovery_do_not_grow() -> None:
    cc = NewReno()
    before = _packets(0, 5, 0.5)
    _send(cc, before)
    _enter_recovery(cc, 1.0)
    cc.on_packets_acked(before, 1.1)
    assert cc.congestion_window == 6000
    assert cc.bytes_in_flight == 0


def test_congestion_avoidance_grows_one_datagram_per_round_trip() -> None:
    cc = NewReno(initial_window=24000)
    _enter_recovery(cc, 1.0)
    assert cc.congestion_window == 12000
    t, pn = 1.0, 0
    for expected in (13200, 14400, 15600, 16800):
        t += 0.1
        flight = _fill_window(cc, pn, t)
        pn += len(flight)
        cc.on_packets_acked(flight, t + 0.1)
        assert cc.congestion_window == expected
    assert not cc.in_slow_start


def test_congestion_avoidance_accumulates_partial_acks() -> None:
    # One ack per packet, refilling the window after each (flight stays ~cwnd).
    cc = NewReno(initial_window=24000)
    _enter_recovery(cc, 1.0)
    pending = _fill_window(cc, 0, 1.5)
    pn = len(pending)
    windows = []
    for _ in range(10):
        cc.on_packets_acked([pending.pop(0)], 1.6)
        windows.append(cc.congestion_window)
        refill = _fill_window(cc, pn, 1.6)
        pn += len(refill)
        pending += refill
    assert windows == [12000] * 9 + [13200]  # 12000 bytes acknowledged: one datagram more


def test_slow_start_stops_at_ssthresh_and_continues_in_avoidance() -> None:
    cc = NewReno(initial_window=24000)
    _enter_recovery(cc, 1.0)  # ssthresh 12000
    cc.on_persistent_congestion(1.0)  # cwnd 2400, slow start up to 12000
    assert cc.in_slow_start
    t, pn = 1.0, 0
    windows = []
    while cc.congestion_window < 14400:
        t += 0.1
        flight = _fill_window(cc, pn, t)
        pn += len(flight)
        cc.on_packets_acked(flight, t + 0.05)
        windows.append(cc.congestion_window)
    # 9600 -> 12000 reaches ssthresh with 7200 bytes left over for avoidance.
    assert windows == [4800, 9600, 12000, 13200, 14400]


def test_persistent_congestion_collapses_to_minimum() -> None:
    cc = NewReno()
    _enter_recovery(cc, 1.0)
    cc.on_persistent_congestion(1.0)
    assert cc.congestion_window == cc.minimum_window == 2400
    assert cc.recovery_start_time is None
    assert cc.ssthresh == 6000
    assert cc.in_slow_start


def test_app_limited_flag_stops_growth() -> None:
    cc = NewReno()
    cc.set_app_limited(True)
    assert cc.app_limited
    flight = _fill_window(cc, 0, 0.0)
    cc.on_packets_acked(flight, 0.1)
    assert cc.congestion_window == 12000
    assert cc.bytes_in_flight == 0
    cc.set_app_limited(False)
    flight = _fill_window(cc, 100, 0.1)
    cc.on_packets_acked(flight, 0.2)
    assert cc.congestion_window == 24000


def test_app_limited_heuristic_needs_half_a_window_in_flight() -> None:
    cc = NewReno()
    small = _packets(0, 4, 0.0)  # 4800 < 12000 / 2
    _send(cc, small)
    cc.on_packets_acked(small, 0.1)
    assert cc.congestion_window == 12000
    half = _packets(10, 5, 0.1)  # 6000 == 12000 / 2: counts as window-limited
    _send(cc, half)
    cc.on_packets_acked(half, 0.2)
    assert cc.congestion_window == 18000


def test_discard_removes_from_flight_without_reacting() -> None:
    cc = NewReno()
    packets = [*_packets(0, 5, 0.0), SentPacket(5, 0.0, 40, False, False)]
    _send(cc, packets[:5])
    cc.discard(packets)
    assert cc.bytes_in_flight == 0
    assert cc.congestion_window == 12000
    assert cc.recovery_start_time is None


# -- pacer ---------------------------------------------------------------------


def test_pacer_never_delays_before_a_rate_is_known() -> None:
    pacer = Pacer()
    assert pacer.rate is None
    for i in range(100):
        assert pacer.next_send_time(0.0, MDS) is None
        pacer.on_packet_sent(0.0 + i * 1e-9, MDS)


def test_pacer_allows_initial_burst_then_spaces_at_the_rate() -> None:
    pacer = Pacer()
    pacer.update_rate(12000, 0.1)
    rate = 1.25 * 12000 / 0.1
    assert pacer.rate == pytest.approx(rate)
    assert pacer.enabled
    assert pacer.capacity == 12000
    now = 5.0
    for _ in range(10):  # the burst: a full bucket of ten datagrams
        assert pacer.next_send_time(now, MDS) is None
        pacer.on_packet_sent(now, MDS)
    interval = MDS / rate  # 8 ms
    sent_at: list[float] = []
    for _ in range(20):
        when = pacer.next_send_time(now, MDS)
        assert when is not None
        assert when == pytest.approx(now + interval if not sent_at else sent_at[-1] + interval)
        now = when
        assert pacer.next_send_time(now, MDS) is None
        pacer.on_packet_sent(now, MDS)
        sent_at.append(now)
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    assert gaps == pytest.approx([interval] * 19)


def test_pacer_refills_while_idle_up_to_capacity() -> None:
    pacer = Pacer(burst_packets=4)
    pacer.update_rate(12000, 0.1)  # 150 kB/s, 4-packet bucket
    for _ in range(4):
        pacer.on_packet_sent(0.0, MDS)
    assert pacer.next_send_time(0.0, MDS) == pytest.approx(0.008)
    # After a long idle period only `capacity` bytes may leave at once.
    now = 100.0
    sent = 0
    while pacer.next_send_time(now, MDS) is None:
        pacer.on_packet_sent(now, MDS)
        sent += 1
    assert sent == 4


def test_pacer_disabled_at_tiny_rtt() -> None:
    pacer = Pacer()
    pacer.update_rate(12000, 50e-6)  # loopback
    assert not pacer.enabled
    for _ in range(1000):
        assert pacer.next_send_time(1.0, MDS) is None
        pacer.on_packet_sent(1.0, MDS)
    pacer.update_rate(12000, 0.0)  # no division by zero
    assert pacer.next_send_time(1.0, MDS) is None


def test_pacer_capacity_covers_a_timer_tick() -> None:
    pacer = Pacer()
    pacer.update_rate(1_000_000, 0.005)  # 250 MB/s: 250 kB per millisecond
    assert pacer.enabled
    assert pacer.capacity == pytest.approx(250_000)


def test_pacer_oversize_packet_waits_for_a_full_bucket_only() -> None:
    pacer = Pacer(burst_packets=1)
    pacer.update_rate(12000, 0.1)
    pacer.on_packet_sent(0.0, MDS)
    when = pacer.next_send_time(0.0, 5000)
    assert when == pytest.approx(MDS / 150_000)
    assert when is not None
    assert pacer.next_send_time(when, 5000) is None


def test_pacer_tokens_never_go_negative() -> None:
    pacer = Pacer()
    pacer.update_rate(12000, 0.1)
    for _ in range(50):  # e.g. probes sent regardless of pacing
        pacer.on_packet_sent(0.0, MDS)
    assert pacer.next_send_time(0.0, MDS) == pytest.approx(0.008)


def test_pacer_validation() -> None:
    with pytest.raises(ValueError, match="burst_packets"):
        Pacer(burst_packets=0)
    with pytest.raises(ValueError, match="max_datagram_size"):
        Pacer(max_datagram_size=0)
