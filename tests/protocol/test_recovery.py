"""RTT estimation and loss recovery (RFC 9002), driven with explicit times."""

from __future__ import annotations

from collections import deque

import pytest

from overlay_httpx import LocalProtocolError, RemoteProtocolError
from overlay_httpx._protocol._congestion import NewReno, Pacer
from overlay_httpx._protocol._recovery import (
    GRANULARITY,
    TIME_THRESHOLD,
    LossRecovery,
    RttEstimator,
    SentPacket,
)

MDS = 1200


def _recovery(
    *, max_ack_delay: float = 0.025, initial_rtt: float = 0.1
) -> tuple[LossRecovery, NewReno]:
    cc = NewReno()
    rec = LossRecovery(congestion=cc, max_ack_delay=max_ack_delay, initial_rtt=initial_rtt)
    return rec, cc


def _send(
    rec: LossRecovery, pn: int, t: float, *, size: int = MDS, ack_eliciting: bool = True
) -> SentPacket:
    p = SentPacket(pn, t, size, ack_eliciting, ack_eliciting, [f"frame-{pn}"])
    rec.on_packet_sent(p)
    return p


def _pns(packets: list[SentPacket]) -> list[int]:
    return [p.packet_number for p in packets]


# -- RTT estimator ------------------------------------------------------------------


def test_rtt_initial_state() -> None:
    rtt = RttEstimator()
    assert (rtt.smoothed_rtt, rtt.rttvar) == (0.1, 0.05)
    assert rtt.latest_rtt is None
    assert rtt.min_rtt is None
    assert not rtt.has_sample
    assert RttEstimator(0.333).rttvar == pytest.approx(0.1665)
    with pytest.raises(ValueError, match="initial_rtt"):
        RttEstimator(0.0)


def test_rtt_first_sample_ignores_ack_delay() -> None:
    rtt = RttEstimator(initial_rtt=0.5)
    rtt.update(0.1, ack_delay=0.05, max_ack_delay=0.025)
    assert rtt.has_sample
    assert (rtt.latest_rtt, rtt.min_rtt, rtt.smoothed_rtt, rtt.rttvar) == (0.1, 0.1, 0.1, 0.05)


def test_rtt_hand_computed_sequence() -> None:
    rtt = RttEstimator()
    rtt.update(0.1, 0.0, 0.025)
    # ack_delay 0.030 is capped at max_ack_delay 0.025; 0.2 >= 0.1 + 0.025 so it is
    # subtracted: adjusted = 0.175.
    rtt.update(0.2, 0.030, 0.025)
    assert rtt.min_rtt == 0.1
    assert rtt.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.075)  # 0.05625
    assert rtt.smoothed_rtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.175)  # 0.109375
    # 0.11 < min_rtt + ack_delay = 0.12: the ack delay is not subtracted.
    rtt.update(0.11, 0.020, 0.025)
    assert rtt.rttvar == pytest.approx(0.75 * 0.05625 + 0.25 * 0.000625)  # 0.04234375
    assert rtt.smoothed_rtt == pytest.approx(0.875 * 0.109375 + 0.125 * 0.11)  # 0.109453125
    assert rtt.latest_rtt == 0.11
    # A smaller sample moves min_rtt, ack delay included or not.
    rtt.update(0.05, 0.01, 0.025)
    assert rtt.min_rtt == 0.05
    assert rtt.smoothed_rtt == pytest.approx(0.875 * 0.109453125 + 0.125 * 0.05)


def test_rtt_rejects_negative_sample() -> None:
    with pytest.raises(ValueError, match="negative"):
        RttEstimator().update(-0.001, 0.0, 0.025)


# -- acknowledgements -------------------------------------------------------------


def test_ack_ranges_ack_the_right_packets() -> None:
    rec, cc = _recovery()
    for pn in range(8):
        _send(rec, pn, pn * 0.001)
    assert rec.sent_packets_count == 8
    assert rec.bytes_in_flight == 8 * MDS
    res = rec.on_ack_received([(5, 6), (0, 3)], 0.0, 0.1)
    assert _pns(res.acked) == [0, 1, 2, 3, 5, 6]
    assert res.acked[0].frames == ["frame-0"]
    assert res.lost == []  # 4 is only 2 below 6 and was sent recently
    assert res.rtt_sample == pytest.approx(0.1 - 0.006)
    assert not res.persistent_congestion
    assert rec.largest_acked == 6
    assert rec.sent_packets_count == 2  # 4 and 7
    assert cc.bytes_in_flight == 2 * MDS
    assert rec.rtt.has_sample


def test_ack_ranges_with_holes_declare_older_packets_lost() -> None:
    rec, _ = _recovery()
    for pn in range(10):
        _send(rec, pn, 0.0)
    res = rec.on_ack_received([(7, 9), (2, 4)], 0.0, 0.1)
    assert _pns(res.acked) == [2, 3, 4, 7, 8, 9]
    assert _pns(res.lost) == [0, 1, 5, 6]  # all at least 3 below 9
    assert rec.sent_packets_count == 0


def test_ack_ranges_in_any_order_and_overlapping() -> None:
    rec, _ = _recovery()
    for pn in range(6):
        _send(rec, pn, 0.0)
    res = rec.on_ack_received([(0, 1), (4, 5), (1, 2), (4, 4)], 0.0, 0.1)
    assert _pns(res.acked) == [0, 1, 2, 4, 5]


def test_duplicate_and_unknown_acks_are_ignored() -> None:
    rec, cc = _recovery()
    for pn in (0, 1, 2, 5, 6):  # 3 and 4 were never registered
        _send(rec, pn, 0.0)
    first = rec.on_ack_received([(0, 1)], 0.0, 0.1)
    assert _pns(first.acked) == [0, 1]
    again = rec.on_ack_received([(0, 1)], 0.0, 0.2)
    assert again.acked == []
    assert again.lost == []
    assert again.rtt_sample is None
    res = rec.on_ack_received([(3, 4)], 0.0, 0.3)
    assert res.acked == []
    assert rec.largest_acked == 4  # still recorded, as in RFC 9002 A.7
    assert cc.bytes_in_flight == 3 * MDS


def test_ack_of_never_sent_packet_raises() -> None:
    rec, _ = _recovery()
    with pytest.raises(RemoteProtocolError, match="never sent"):
        rec.on_ack_received([(0, 0)], 0.0, 0.1)
    for pn in range(4):
        _send(rec, pn, 0.0)
    with pytest.raises(
        RemoteProtocolError, match=r"packet 5, which was never sent.*largest sent is 3"
    ):
        rec.on_ack_received([(5, 5), (0, 2)], 0.0, 0.1)
    # Nothing was changed by the rejected frame.
    assert rec.sent_packets_count == 4
    assert rec.largest_acked is None
    with pytest.raises(RemoteProtocolError, match="malformed"):
        rec.on_ack_received([(3, 2)], 0.0, 0.1)


def test_empty_ack_frame_changes_nothing() -> None:
    rec, _ = _recovery()
    _send(rec, 0, 0.0)
    res = rec.on_ack_received([], 0.0, 0.1)
    assert res.acked == []
    assert rec.sent_packets_count == 1


def test_rtt_sample_only_when_largest_newly_acked_and_ack_eliciting() -> None:
    rec, _ = _recovery()
    _send(rec, 0, 0.0)
    _send(rec, 1, 0.01)
    _send(rec, 2, 0.02, size=40, ack_eliciting=False)
    res = rec.on_ack_received([(1, 1)], 0.0, 0.1)
    assert res.rtt_sample == pytest.approx(0.09)
    # Largest (1) already acknowledged: 0 is newly acked but gives no sample.
    res = rec.on_ack_received([(0, 1)], 0.0, 0.2)
    assert _pns(res.acked) == [0]
    assert res.rtt_sample is None
    # Only a non-ack-eliciting packet newly acked: no sample either.
    res = rec.on_ack_received([(2, 2)], 0.0, 0.3)
    assert _pns(res.acked) == [2]
    assert res.rtt_sample is None
    assert rec.rtt.latest_rtt == pytest.approx(0.09)


def test_ack_delay_is_applied_to_the_sample() -> None:
    rec, _ = _recovery(max_ack_delay=0.025)
    _send(rec, 0, 0.0)
    rec.on_ack_received([(0, 0)], 0.0, 0.05)
    _send(rec, 1, 1.0)
    rec.on_ack_received([(1, 1)], 0.02, 1.09)
    assert rec.rtt.smoothed_rtt == pytest.approx(0.875 * 0.05 + 0.125 * 0.07)


def test_packet_numbers_must_increase() -> None:
    rec, _ = _recovery()
    _send(rec, 5, 0.0)
    with pytest.raises(LocalProtocolError, match="strictly increase"):
        _send(rec, 5, 0.0)
    with pytest.raises(LocalProtocolError, match="not in flight"):
        rec.on_packet_sent(SentPacket(6, 0.0, 10, True, False))
    assert rec.largest_sent == 5


# -- loss detection ---------------------------------------------------------------


def test_packet_threshold_loss() -> None:
    rec, cc = _recovery()
    for pn in range(6):
        _send(rec, pn, pn * 0.001)
    res = rec.on_ack_received([(3, 3)], 0.0, 0.05)
    assert _pns(res.lost) == [0]  # 3 - 0 >= 3
    assert res.lost[0].frames == ["frame-0"]
    assert rec.sent_packets_count == 4  # 1, 2, 4, 5
    # 1 and 2 wait for the time threshold: the loss timer is armed for 1.
    loss_delay = TIME_THRESHOLD * 0.047
    assert rec.get_loss_detection_timer() == pytest.approx(0.001 + loss_delay)
    assert cc.congestion_window == 6000  # the loss entered recovery
    res = rec.on_ack_received([(4, 5)], 0.0, 0.051)
    assert _pns(res.lost) == [1, 2]
    assert _pns(res.acked) == [4, 5]
    assert cc.congestion_window == 6000  # same recovery period: no second reduction
    assert rec.sent_packets_count == 0
    assert rec.get_loss_detection_timer() is None


def test_time_threshold_loss_and_loss_timer() -> None:
    rec, _ = _recovery()
    _send(rec, 0, 0.0)
    _send(rec, 1, 0.01)
    res = rec.on_ack_received([(1, 1)], 0.0, 0.1)
    assert res.lost == []
    loss_delay = TIME_THRESHOLD * 0.09  # max(latest_rtt, smoothed_rtt), both 0.09
    timer = rec.get_loss_detection_timer()
    assert timer == pytest.approx(0.0 + loss_delay)
    assert timer is not None
    early = rec.on_loss_detection_timeout(timer - 0.001)
    assert early.lost == []
    assert early.probes == 0
    assert rec.sent_packets_count == 1
    fired = rec.on_loss_detection_timeout(timer)
    assert _pns(fired.lost) == [0]
    assert fired.probes == 0
    assert rec.pto_count == 0
    assert rec.get_loss_detection_timer() is None
    assert rec.bytes_in_flight == 0


def test_loss_delay_has_a_granularity_floor() -> None:
    rec, _ = _recovery()
    _send(rec, 0, 0.0)
    _send(rec, 1, 0.00001)
    rec.on_ack_received([(1, 1)], 0.0, 0.00002)  # a 10 us RTT
    assert rec.get_loss_detection_timer() == pytest.approx(GRANULARITY)


def test_pto_fires_with_backoff_probes_and_resets_on_ack() -> None:
    rec, _ = _recovery(max_ack_delay=0.025, initial_rtt=0.1)
    assert rec.get_loss_detection_timer() is None
    _send(rec, 0, 0.0)
    base = 0.1 + 4 * 0.05 + 0.025  # srtt + 4 * rttvar + max_ack_delay
    assert rec.pto_interval() == pytest.approx(base)
    assert rec.get_loss_detection_timer() == pytest.approx(base)
    early = rec.on_loss_detection_timeout(0.3)
    assert (early.probes, rec.pto_count) == (0, 0)

    first = rec.on_loss_detection_timeout(base)
    assert first.lost == []
    assert first.probes == 1
    assert rec.pto_count == 1
    assert rec.pto_interval() == pytest.approx(2 * base)
    assert rec.get_loss_detection_timer() == pytest.approx(2 * base)  # from the last send
    _send(rec, 1, base)  # the probe
    t2 = base + 2 * base
    assert rec.get_loss_detection_timer() == pytest.approx(t2)
    second = rec.on_loss_detection_timeout(t2)
    assert (second.probes, rec.pto_count) == (2, 2)
    _send(rec, 2, t2)
    _send(rec, 3, t2)
    t3 = t2 + 4 * base
    assert rec.get_loss_detection_timer() == pytest.approx(t3)
    third = rec.on_loss_detection_timeout(t3)
    assert (third.probes, rec.pto_count) == (2, 3)
    assert rec.pto_interval() == pytest.approx(8 * base)
    assert rec.sent_packets_count == 4  # a PTO declares nothing lost

    res = rec.on_ack_received([(3, 3)], 0.0, t3 + 0.01)
    assert rec.pto_count == 0
    assert _pns(res.acked) == [3]
    # 0 by packet threshold, 1 by time; 2 was sent one sample (1.31 s) ago, too recently.
    assert _pns(res.lost) == [0, 1]
    loss_delay = TIME_THRESHOLD * (4 * base + 0.01)
    assert rec.get_loss_detection_timer() == pytest.approx(t2 + loss_delay)


def test_no_pto_without_ack_eliciting_packets_in_flight() -> None:
    rec, cc = _recovery()
    _send(rec, 0, 0.0, size=40, ack_eliciting=False)
    assert cc.bytes_in_flight == 0
    assert rec.get_loss_detection_timer() is None
    assert rec.on_loss_detection_timeout(10.0).probes == 0
    assert rec.ack_eliciting_in_flight == 0


def test_pto_backoff_does_not_overflow() -> None:
    rec, _ = _recovery()
    _send(rec, 0, 0.0)
    for _ in range(200):
        timer = rec.get_loss_detection_timer()
        assert timer is not None
        assert rec.on_loss_detection_timeout(timer).probes >= 1
    assert rec.pto_count == 200
    assert rec.pto_interval() < float("inf")


def test_pto_backoff_is_capped_so_a_returning_path_is_probed_in_time() -> None:
    from overlay_httpx._protocol._recovery import MAX_PTO_PERIOD

    rec, _ = _recovery()
    _send(rec, 0, 0.0)
    periods = []
    for _ in range(20):
        timer = rec.get_loss_detection_timer()
        assert timer is not None
        rec.on_loss_detection_timeout(timer)
        periods.append(rec.pto_interval())
    assert periods[3] > periods[2] > periods[1]  # it backs off...
    assert max(periods) <= MAX_PTO_PERIOD  # ...but never past the cap
    assert periods[-1] == pytest.approx(MAX_PTO_PERIOD)


# -- persistent congestion ------------------------------------------------------


def _congested(rec: LossRecovery, *, ack_middle: bool) -> tuple[list[SentPacket], bool]:
    _send(rec, 0, 0.0)
    rec.on_ack_received([(0, 0)], 0.0, 0.1)  # srtt 0.1, rttvar 0.05
    # duration = (0.1 + 0.2 + 0.025) * 3 = 0.975 s; these span 1.35 s.
    for i in range(10):
        _send(rec, 1 + i, 0.2 + i * 0.15)
    _send(rec, 11, 1.6)
    ranges = [(11, 11), (5, 5)] if ack_middle else [(11, 11)]
    res = rec.on_ack_received(ranges, 0.0, 1.7)
    return res.lost, res.persistent_congestion


def test_persistent_congestion_collapses_window() -> None:
    rec, cc = _recovery()
    lost, persistent = _congested(rec, ack_middle=False)
    assert _pns(lost) == list(range(1, 11))
    assert persistent
    # Collapsed to the minimum (2400), then packet 11, acknowledged by the same
    # frame and sent after recovery ended, grew it in slow start: RFC 9002 B.8
    # processes the losses before the acknowledgements.
    assert cc.minimum_window == 2400
    assert cc.congestion_window == 2400 + MDS
    assert cc.recovery_start_time is None


def test_no_persistent_congestion_when_a_packet_between_is_acked() -> None:
    rec, cc = _recovery()
    lost, persistent = _congested(rec, ack_middle=True)
    assert _pns(lost) == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert not persistent
    assert cc.congestion_window == 6000


def test_no_persistent_congestion_before_the_first_rtt_sample() -> None:
    rec, cc = _recovery()
    for i in range(10):
        _send(rec, i, i * 0.15)
    _send(rec, 10, 1.6)
    res = rec.on_ack_received([(10, 10)], 0.0, 1.7)
    assert len(res.lost) == 10
    assert not res.persistent_congestion
    assert cc.congestion_window == 6000


def test_persistent_congestion_via_loss_timer() -> None:
    rec, cc = _recovery()
    _send(rec, 0, 0.0)
    rec.on_ack_received([(0, 0)], 0.0, 0.1)
    _send(rec, 1, 0.2)
    _send(rec, 2, 1.3)
    _send(rec, 3, 1.35)
    rec.on_ack_received([(3, 3)], 0.0, 1.40)  # 1 lost now (time), 2 waits for the timer
    assert cc.congestion_window == 6000
    timer = rec.get_loss_detection_timer()
    assert timer is not None
    res = rec.on_loss_detection_timeout(timer)
    assert _pns(res.lost) == [2]
    assert not res.persistent_congestion  # 1 and 2 were lost in different batches


# -- bookkeeping ------------------------------------------------------------------


def test_discard_all() -> None:
    rec, cc = _recovery()
    for pn in range(5):
        _send(rec, pn, 0.0)
    _send(rec, 5, 0.0, size=40, ack_eliciting=False)
    dropped = rec.discard_all()
    assert _pns(dropped) == [0, 1, 2, 3, 4, 5]
    assert rec.sent_packets_count == 0
    assert cc.bytes_in_flight == 0
    assert cc.congestion_window == 12000
    assert rec.get_loss_detection_timer() is None
    _send(rec, 6, 1.0)
    res = rec.on_ack_received([(0, 6)], 0.0, 1.1)
    assert _pns(res.acked) == [6]


def test_pacer_rate_follows_window_and_rtt() -> None:
    pacer = Pacer()
    rec = LossRecovery(congestion=NewReno(), pacer=pacer)
    assert rec.pacer is pacer
    assert pacer.rate == pytest.approx(1.25 * 12000 / 0.1)
    for pn in range(10):
        _send(rec, pn, 0.0)
    assert pacer.next_send_time(0.0, MDS) is not None  # the initial burst is spent
    rec.on_ack_received([(0, 9)], 0.0, 0.02)
    assert pacer.rate == pytest.approx(1.25 * 24000 / 0.02)


# -- a long synthetic run -------------------------------------------------------


def _ranges(received: set[int], low: int, high: int) -> list[tuple[int, int]]:
    """ACK ranges over `received` within [low, high], descending like the frame."""
    out: list[tuple[int, int]] = []
    pn = high
    while pn >= low:
        if pn not in received:
            pn -= 1
            continue
        top = pn
        while pn - 1 >= low and pn - 1 in received:
            pn -= 1
        out.append((pn, top))
        pn -= 1
    return out


def test_synthetic_run_loses_exactly_the_dropped_packets_and_keeps_nothing() -> None:
    total = 10_000
    rtt = 0.01
    cc = NewReno()
    rec = LossRecovery(congestion=cc, pacer=Pacer())
    now = 0.0
    next_pn = 0
    received: set[int] = set()
    dropped: set[int] = set()
    acked: set[int] = set()
    lost: set[int] = set()
    pending: deque[tuple[float, list[tuple[int, int]]]] = deque()  # ACKs on the way back
    max_tracked = 0
    probes_sent = 0

    def send(count: int | None) -> None:
        nonlocal next_pn
        first = next_pn
        while (count is None and next_pn < total and cc.can_send(MDS)) or (
            count is not None and next_pn < first + count
        ):
            pn = next_pn
            rec.on_packet_sent(SentPacket(pn, now, MDS, True, True))
            # 1 % of packets vanish, and so does the last one (to exercise PTO).
            if pn % 100 == 37 or pn == total - 1:
                dropped.add(pn)
            else:
                received.add(pn)
            next_pn += 1
        if next_pn > first and any(pn in received for pn in range(first, next_pn)):
            # The receiver acknowledges what it has, repeating recent ranges.
            pending.append((now + rtt, _ranges(received, first - 20, next_pn - 1)))

    for _ in range(100_000):
        send(None)
        max_tracked = max(max_tracked, rec.sent_packets_count)
        timer = rec.get_loss_detection_timer()
        if pending and (timer is None or pending[0][0] <= timer):
            now, ranges = pending.popleft()
            res = rec.on_ack_received(ranges, 0.0, now)
            acked.update(_pns(res.acked))
            lost.update(_pns(res.lost))
        elif timer is not None:
            now = timer
            out = rec.on_loss_detection_timeout(now)
            lost.update(_pns(out.lost))
            probes_sent += out.probes
            send(out.probes)
        elif next_pn >= total:
            break
    else:
        pytest.fail("the run did not finish")

    assert next_pn >= total
    assert probes_sent >= 1
    assert lost == dropped
    assert acked == received
    assert not acked & lost
    assert rec.sent_packets_count == 0
    assert len(rec._order) == 0  # the send-order index is trimmed too
    assert rec.bytes_in_flight == 0
    assert rec.ack_eliciting_in_flight == 0
    assert max_tracked < 200
    assert cc.congestion_window >= cc.minimum_window
