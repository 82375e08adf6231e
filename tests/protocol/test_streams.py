"""Stream buffers, flow-control windows, the interval set and stream-id parity."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay_httpx._exceptions import FlowControlError, LocalProtocolError
from overlay_httpx._protocol._streams import (
    FlowWindow,
    RecvBuffer,
    SendBuffer,
    SendCredit,
    _RangeSet,
    is_local_stream,
    stream_id_parity,
)

NO_LIMIT = 1 << 62
DATA = bytes(range(256)) * 40  # 10240 bytes, every offset recognisable mod 256


Frame = tuple[int, bytes, bool]


def drain(buf: SendBuffer, max_data: int = 1000, limit: int = NO_LIMIT) -> list[Frame]:
    frames: list[Frame] = []
    while (frame := buf.next_frame(max_data, limit)) is not None:
        frames.append(frame)
    return frames


# -- _RangeSet -------------------------------------------------------------------------


def test_rangeset_add_merges_overlapping_and_touching() -> None:
    r = _RangeSet()
    assert r.first() is None
    assert len(r) == 0
    r.add(10, 20)
    r.add(30, 40)
    r.add(0, 5)
    assert r.ranges() == [(0, 5), (10, 20), (30, 40)]
    r.add(5, 10)  # touches both neighbours
    assert r.ranges() == [(0, 20), (30, 40)]
    r.add(15, 35)
    assert r.ranges() == [(0, 40)]
    r.add(3, 3)  # empty: no-op
    r.add(50, 60)
    r.add(45, 47)
    r.add(39, 46)
    assert r.ranges() == [(0, 47), (50, 60)]
    r.add(-5, 100)
    assert r.ranges() == [(-5, 100)]
    assert r.total() == 105


def test_rangeset_add_in_order_extends_last() -> None:
    r = _RangeSet()
    for pn in range(100):
        r.add(pn, pn + 1)
    assert r.ranges() == [(0, 100)]
    r.add(102, 103)
    r.add(101, 102)
    assert r.ranges() == [(0, 100), (101, 103)]


def test_rangeset_remove_splits_and_trims() -> None:
    r = _RangeSet()
    r.add(0, 100)
    r.remove(10, 20)
    assert r.ranges() == [(0, 10), (20, 100)]
    r.remove(5, 25)
    assert r.ranges() == [(0, 5), (25, 100)]
    r.remove(0, 5)
    assert r.ranges() == [(25, 100)]
    r.remove(90, 200)
    r.remove(0, 25)  # touches only: no change
    assert r.ranges() == [(25, 90)]
    r.add(95, 99)
    r.remove(30, 96)
    assert r.ranges() == [(25, 30), (96, 99)]
    r.remove(0, 1000)
    assert r.ranges() == []


def test_rangeset_contains_first_pop_missing() -> None:
    r = _RangeSet()
    r.add(10, 20)
    r.add(30, 40)
    assert 10 in r
    assert 19 in r
    assert 20 not in r
    assert 9 not in r
    assert "x" not in r
    assert r.contains(12, 20)
    assert not r.contains(12, 21)
    assert not r.contains(15, 35)
    assert r.contains(25, 25)
    assert r.first() == (10, 20)
    assert r.missing(0, 50) == [(0, 10), (20, 30), (40, 50)]
    assert r.missing(12, 18) == []
    assert r.missing(15, 35) == [(20, 30)]
    assert r.missing(20, 30) == [(20, 30)]
    assert r.pop_first() == (10, 20)
    assert r.first() == (30, 40)
    assert len(r) == 1


@settings(derandomize=True, max_examples=200)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.integers(0, 20)), max_size=30))
def test_rangeset_matches_a_python_set(ops: list[tuple[bool, int, int]]) -> None:
    r = _RangeSet()
    model: set[int] = set()
    for add, start, length in ops:
        if add:
            r.add(start, start + length)
            model |= set(range(start, start + length))
        else:
            r.remove(start, start + length)
            model -= set(range(start, start + length))
        ranges = r.ranges()
        assert {i for lo, hi in ranges for i in range(lo, hi)} == model
        assert all(lo < hi for lo, hi in ranges)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))  # disjoint, not touching
        assert r.total() == len(model)
    gaps = r.missing(0, 90)
    assert {i for lo, hi in gaps for i in range(lo, hi)} == set(range(90)) - model


# -- SendBuffer ------------------------------------------------------------------------


def test_send_splits_writes_into_frames() -> None:
    buf = SendBuffer()
    buf.write(DATA[:2500])
    assert buf.unsent == 2500
    frames = drain(buf)
    assert [(o, len(d), f) for o, d, f in frames] == [
        (0, 1000, False),
        (1000, 1000, False),
        (2000, 500, False),
    ]
    assert b"".join(d for _, d, _ in frames) == DATA[:2500]
    assert buf.unsent == 0
    assert buf.highest_sent == 2500
    assert buf.buffered == 2500


def test_send_in_order_acks_free_memory() -> None:
    buf = SendBuffer()
    buf.write(DATA[:3000])
    frames = drain(buf)
    for i, (offset, data, fin) in enumerate(frames):
        buf.on_acked(offset, len(data), fin)
        assert buf.buffered == 3000 - 1000 * (i + 1)
        assert len(buf._buf) == buf.buffered
    buf.on_acked(0, 1000, False)  # duplicate ack: idempotent
    assert buf.buffered == 0
    assert not buf.all_acked  # no FIN yet
    buf.finish()
    assert drain(buf) == [(3000, b"", True)]
    buf.on_acked(3000, 0, True)
    assert buf.fin_acked
    assert buf.all_acked


def test_send_out_of_order_acks() -> None:
    buf = SendBuffer()
    buf.write(DATA[:3000])
    buf.finish()
    frames = drain(buf)
    assert frames[-1][2] is True
    buf.on_acked(2000, 1000, True)
    assert buf.buffered == 2000
    assert buf.fin_acked
    assert not buf.all_acked
    assert len(buf._buf) == 3000  # the prefix is still unacknowledged
    buf.on_acked(1000, 1000, False)
    assert buf.buffered == 1000
    buf.on_acked(0, 1000, False)
    assert buf.buffered == 0
    assert len(buf._buf) == 0
    assert buf.all_acked
    assert buf.next_frame(1000, NO_LIMIT) is None


def test_send_lost_middle_range_resent_first_and_once() -> None:
    buf = SendBuffer()
    buf.write(DATA[:3000])
    drain(buf)
    buf.write(DATA[3000:3500])
    buf.on_acked(0, 1000, False)
    buf.on_lost(1000, 1000, False)
    assert buf.has_pending_retransmit
    frame = buf.next_frame(1000, NO_LIMIT)
    assert frame == (1000, DATA[1000:2000], False)
    assert not buf.has_pending_retransmit
    assert buf.next_frame(1000, NO_LIMIT) == (3000, DATA[3000:3500], False)
    assert buf.next_frame(1000, NO_LIMIT) is None


def test_send_lost_range_split_by_max_data() -> None:
    buf = SendBuffer()
    buf.write(DATA[:1000])
    drain(buf)
    buf.on_lost(0, 1000, False)
    assert drain(buf, max_data=400) == [
        (0, DATA[:400], False),
        (400, DATA[400:800], False),
        (800, DATA[800:1000], False),
    ]


def test_send_loss_after_partial_ack_resends_only_unacked() -> None:
    buf = SendBuffer()
    buf.write(DATA[:4000])
    drain(buf, max_data=4000)  # one frame [0, 4000)
    # The same range was also carried by smaller retransmissions, some acknowledged.
    buf.on_acked(0, 500, False)
    buf.on_acked(1000, 1000, False)
    buf.on_acked(3500, 500, False)
    buf.on_lost(0, 4000, False)
    assert drain(buf) == [
        (500, DATA[500:1000], False),
        (2000, DATA[2000:3000], False),
        (3000, DATA[3000:3500], False),
    ]
    # Acknowledging a range that was queued for retransmission cancels it.
    buf.on_lost(500, 500, False)
    buf.on_acked(400, 300, False)
    assert drain(buf) == [(700, DATA[700:1000], False)]
    # Loss of a fully acknowledged range is ignored.
    buf.on_acked(0, 4000, False)
    buf.on_lost(0, 4000, False)
    assert not buf.has_pending_retransmit
    assert buf.buffered == 0


def test_send_fin_with_last_data() -> None:
    buf = SendBuffer()
    buf.write(DATA[:1500])
    buf.finish()
    assert drain(buf) == [(0, DATA[:1000], False), (1000, DATA[1000:1500], True)]


def test_send_fin_alone_and_empty_stream() -> None:
    buf = SendBuffer()
    buf.write(b"hello")
    assert drain(buf) == [(0, b"hello", False)]
    buf.finish()
    assert buf.has_pending
    assert drain(buf, max_data=0) == [(5, b"", True)]
    empty = SendBuffer()
    empty.finish()
    assert drain(empty) == [(0, b"", True)]
    empty.on_acked(0, 0, True)
    assert empty.all_acked


def test_send_lost_fin_resent() -> None:
    buf = SendBuffer()
    buf.write(b"abc")
    buf.finish()
    assert drain(buf) == [(0, b"abc", True)]
    buf.on_lost(0, 3, True)
    assert buf.has_pending_retransmit
    assert drain(buf) == [(0, b"abc", True)]
    # Data acknowledged elsewhere, FIN lost again: a bare FIN goes.
    buf.on_acked(0, 3, False)
    buf.on_lost(0, 3, True)
    assert drain(buf) == [(3, b"", True)]
    buf.on_acked(3, 0, True)
    buf.on_lost(3, 0, True)  # late loss report of an acknowledged FIN
    assert not buf.has_pending_retransmit
    assert drain(buf) == []
    assert buf.all_acked


def test_send_flow_limit_caps_new_data_not_retransmission() -> None:
    buf = SendBuffer()
    buf.write(DATA[:5000])
    assert drain(buf, limit=1500) == [(0, DATA[:1000], False), (1000, DATA[1000:1500], False)]
    assert buf.highest_sent == 1500
    assert buf.unsent == 3500
    buf.on_lost(0, 1000, False)
    # The limit is below what was sent: retransmission still goes, new data does not.
    assert drain(buf, limit=500) == [(0, DATA[:1000], False)]
    assert drain(buf, limit=2000) == [(1500, DATA[1500:2000], False)]
    buf.finish()
    assert drain(buf, limit=2000) == []  # FIN waits for the data before it
    assert drain(buf, max_data=5000, limit=NO_LIMIT) == [(2000, DATA[2000:5000], True)]


def test_send_write_after_finish_or_reset_raises() -> None:
    buf = SendBuffer()
    buf.finish()
    buf.finish()  # idempotent
    with pytest.raises(LocalProtocolError):
        buf.write(b"x")
    other = SendBuffer()
    other.reset()
    with pytest.raises(LocalProtocolError):
        other.write(b"x")


def test_send_reset_drops_data_and_returns_final_size() -> None:
    buf = SendBuffer()
    buf.write(DATA[:3000])
    buf.next_frame(1000, NO_LIMIT)
    buf.on_lost(0, 1000, False)
    assert buf.reset() == 1000
    assert buf.reset() == 1000
    assert buf.highest_sent == 1000
    assert buf.buffered == 0
    assert buf.unsent == 0
    assert not buf.has_pending
    assert buf.next_frame(1000, NO_LIMIT) is None
    buf.on_acked(0, 1000, False)
    buf.on_lost(0, 1000, True)
    assert not buf.all_acked


@pytest.mark.parametrize("seed", range(20))
def test_send_and_recv_over_a_lossy_reordering_channel(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(0, 20000))
    sender, receiver = SendBuffer(), RecvBuffer()
    sender.write(data[: len(data) // 2])
    in_flight: list[tuple[int, bytes, bool]] = []
    out = bytearray()
    for step in range(10000):
        if step == 5:
            sender.write(data[len(data) // 2 :])
            sender.finish()
        while len(in_flight) < 8 and (frame := sender.next_frame(rng.randrange(0, 900), NO_LIMIT)):
            in_flight.append(frame)
        if not in_flight:
            if sender.all_acked:
                break
            continue
        offset, chunk, fin = in_flight.pop(rng.randrange(len(in_flight)))
        if rng.random() < 0.3:
            sender.on_lost(offset, len(chunk), fin)
            continue
        receiver.add(offset, chunk, fin)
        out += receiver.read(rng.randrange(-1, 3000))
        if rng.random() < 0.1:  # ack lost, frame declared lost spuriously
            sender.on_lost(offset, len(chunk), fin)
        else:
            sender.on_acked(offset, len(chunk), fin)
    out += receiver.read()
    assert sender.all_acked
    assert bytes(out) == data
    assert receiver.eof
    assert receiver.buffered == 0


# -- RecvBuffer ------------------------------------------------------------------------


def test_recv_in_order() -> None:
    buf = RecvBuffer()
    assert buf.add(0, b"hello ", False) == 6
    assert buf.readable == 6
    assert buf.add(6, b"world", True) == 5
    assert buf.final_size == 11
    assert not buf.eof
    assert buf.read(3) == b"hel"
    assert buf.read_offset == 3
    assert buf.read() == b"lo world"
    assert buf.eof
    assert buf.read() == b""
    assert buf.buffered == 0


def test_recv_reversed_order() -> None:
    buf = RecvBuffer()
    chunks = [(i, DATA[i : i + 100]) for i in range(0, 1000, 100)]
    for offset, chunk in reversed(chunks):
        added = buf.add(offset, chunk, offset == 900)
        assert added == (1000 if offset == 900 else 0)
        if offset:
            assert buf.readable == 0
    assert buf.highest_received == 1000
    assert buf.buffered == 1000
    assert buf.read() == DATA[:1000]
    assert buf.eof


def test_recv_drops_duplicates_on_arrival() -> None:
    buf = RecvBuffer()
    buf.add(100, DATA[100:200], False)
    buf.add(150, DATA[150:300], False)
    buf.add(100, DATA[100:300], False)
    assert buf.buffered == 200
    assert buf.add(0, DATA[:120], False) == 0
    assert buf.buffered == 300
    assert buf.read(50) == DATA[:50]
    buf.add(0, DATA[:100], False)  # entirely below what is ready: dropped
    assert buf.buffered == 250
    assert buf.read() == DATA[50:300]
    buf.add(0, DATA[:300], False)
    assert buf.buffered == 0
    assert buf.readable == 0


def test_recv_read_sizes() -> None:
    buf = RecvBuffer()
    buf.add(0, b"abc", False)
    buf.add(3, b"defg", False)
    assert buf.read(0) == b""
    assert buf.read(2) == b"ab"
    assert buf.read(3) == b"cde"
    assert buf.read(100) == b"fg"
    assert isinstance(buf.read(), bytes)


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([(0, b"abc", True), (2, b"cde", False)], "past the final size"),
        ([(0, b"abc", True), (0, b"ab", True)], "second different final size"),
        ([(0, b"abc", True), (0, b"abcd", True)], "second different final size"),
        ([(0, b"abcdef", False), (0, b"abc", True)], "below data already received"),
    ],
)
def test_recv_final_size_violations(frames: list[tuple[int, bytes, bool]], message: str) -> None:
    buf = RecvBuffer()
    for offset, data, fin in frames[:-1]:
        buf.add(offset, data, fin)
    with pytest.raises(FlowControlError, match=message):
        buf.add(*frames[-1])


def test_recv_repeated_fin_is_fine() -> None:
    buf = RecvBuffer()
    buf.add(3, b"", True)
    buf.add(0, b"abc", True)
    buf.add(1, b"bc", True)
    assert buf.read() == b"abc"
    assert buf.eof


def test_recv_reset() -> None:
    buf = RecvBuffer()
    buf.add(0, b"abc", False)
    buf.add(10, b"xyz", False)
    with pytest.raises(FlowControlError, match="below data already received"):
        buf.reset(5)
    buf.reset(20)
    assert buf.final_size == 20
    assert buf.highest_received == 20
    assert buf.buffered == 0
    assert buf.read() == b""
    assert not buf.eof
    assert buf.add(13, b"late", False) == 0  # late data below the final size is dropped
    assert buf.buffered == 0
    with pytest.raises(FlowControlError, match="past the final size"):
        buf.add(18, b"late", False)
    with pytest.raises(FlowControlError, match="second different final size"):
        buf.reset(21)
    buf.reset(20)


def test_recv_reset_after_fin_must_match() -> None:
    buf = RecvBuffer()
    buf.add(0, b"abc", True)
    with pytest.raises(FlowControlError):
        buf.reset(4)
    buf.reset(3)


@st.composite
def split_frames(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, bytes, bool]]]:
    """A byte string cut into overlapping frames, plus duplicates, in any order."""
    data = draw(st.binary(max_size=300))
    n = len(data)
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=12))) | {0, n})
    spans = []
    for lo, hi in itertools.pairwise(cuts):
        lo = max(0, lo - draw(st.integers(0, 10)))
        hi = min(n, hi + draw(st.integers(0, 10)))
        spans.append((lo, hi))
    if not spans:
        spans.append((0, 0))
    extra = draw(st.lists(st.tuples(st.integers(0, n), st.integers(0, 50)), max_size=6))
    spans += [(lo, min(n, lo + length)) for lo, length in extra]
    spans += draw(st.lists(st.sampled_from(spans), max_size=4))  # exact duplicates
    frames = [(lo, data[lo:hi], hi == n) for lo, hi in spans]
    return data, draw(st.permutations(frames))


@settings(derandomize=True, max_examples=300)
@given(split_frames(), st.lists(st.integers(-1, 40), min_size=1))
def test_recv_reassembles_any_split_and_order(
    case: tuple[bytes, list[tuple[int, bytes, bool]]], read_sizes: list[int]
) -> None:
    data, frames = case
    buf = RecvBuffer()
    out = bytearray()
    fin_seen = False
    total_added = 0
    for i, (offset, chunk, fin) in enumerate(frames):
        total_added += buf.add(offset, chunk, fin)
        fin_seen = fin_seen or fin
        assert buf.buffered <= len(data) - buf.read_offset
        out += buf.read(read_sizes[i % len(read_sizes)])
        assert buf.read_offset == len(out)
        assert buf.eof == (fin_seen and len(out) == len(data))
    out += buf.read()
    assert bytes(out) == data
    assert total_added == len(data) == buf.highest_received
    assert buf.eof
    assert buf.buffered == 0


# -- FlowWindow and SendCredit ---------------------------------------------------------


def test_window_update_at_half() -> None:
    w = FlowWindow(1000, maximum=16000)
    assert w.limit == 1000
    w.on_received(1000)
    assert w.on_consumed(400, now=0.0, rtt=0.1) is None
    assert w.on_consumed(500, now=0.0, rtt=0.1) is None  # exactly half left
    assert w.on_consumed(501, now=0.0, rtt=0.1) == 1501
    assert w.limit == 1501
    assert w.window == 1000  # first update: nothing to compare with
    assert w.on_consumed(600, now=0.1, rtt=0.1) is None


def test_window_violation_raises() -> None:
    w = FlowWindow(1000, maximum=16000)
    w.on_received(1000)
    with pytest.raises(FlowControlError, match="past the advertised limit 1000"):
        w.on_received(1001)


def test_window_autotunes_when_consumed_fast_and_caps() -> None:
    w = FlowWindow(1000, maximum=5000)
    now, rtt = 0.0, 0.1
    assert w.on_consumed(600, now, rtt) == 1600
    now += 0.15  # within 2 * rtt: double
    assert w.on_consumed(1200, now, rtt) == 1200 + 2000
    assert w.window == 2000
    now += 0.19
    assert w.on_consumed(2300, now, rtt) == 2300 + 4000
    now += 0.01
    assert w.on_consumed(4400, now, rtt) == 4400 + 5000  # capped at the maximum
    assert w.window == 5000
    now += 0.01
    assert w.on_consumed(6901, now, rtt) == 6901 + 5000
    assert w.window == 5000


def test_window_does_not_grow_when_consumed_slowly() -> None:
    w = FlowWindow(1000, maximum=5000)
    assert w.on_consumed(600, 0.0, 0.1) == 1600
    assert w.on_consumed(1200, 0.2, 0.1) == 2200  # exactly 2 * rtt later: no growth
    assert w.on_consumed(1800, 1.0, 0.1) == 2800
    assert w.window == 1000


def test_send_credit() -> None:
    c = SendCredit(1000)
    assert c.limit == 1000
    assert c.available(300) == 700
    assert c.available(1200) == 0
    assert c.update(2000)
    assert not c.update(1500)  # stale, reordered
    assert not c.update(2000)
    assert c.limit == 2000


# -- stream ids ------------------------------------------------------------------------


def test_stream_id_parity() -> None:
    low = bytes(31) + b"\x01"
    high = b"\x01" + bytes(31)
    assert stream_id_parity(low, high) == 0
    assert stream_id_parity(high, low) == 1
    assert stream_id_parity(b"\x00\xff" + bytes(30), b"\x01\x00" + bytes(30)) == 0
    with pytest.raises(LocalProtocolError):
        stream_id_parity(low, low)
    assert is_local_stream(0, 0)
    assert is_local_stream(4, 0)
    assert not is_local_stream(3, 0)
    assert is_local_stream(3, 1)
    assert not is_local_stream(2, 1)
