"""Per-stream byte buffers and flow-control accounting (RFC 9000 §2-4), sans-IO.

`SendBuffer` keeps what the application wrote until the peer acknowledged it
and decides what the next STREAM frame carries: lost ranges first, then new
bytes within the peer's credit, then a bare FIN. `RecvBuffer` reassembles
out-of-order frames into an in-order byte stream and polices the final size.
`FlowWindow` is our receive credit (auto-tuned like quic-go and Chromium);
`SendCredit` is the peer's credit as we see it. Offsets are absolute stream
offsets throughout; the tunnel wires these to frames, packets and the clock.

Everything here runs per packet, so no per-byte work: byte ranges live in
`_RangeSet` (a short sorted list of intervals) and buffers are trimmed in
whole slices.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from typing import Final

from .._exceptions import FlowControlError, LocalProtocolError

__all__ = [
    "FlowWindow",
    "RecvBuffer",
    "SendBuffer",
    "SendCredit",
    "is_local_stream",
    "stream_id_parity",
]

_AUTOTUNE_RTTS: Final = 2.0  # a window used up faster than this many RTTs grows


class _RangeSet:
    """A set of integers stored as disjoint, sorted half-open ``[start, end)`` intervals.

    Adjacent intervals merge, so ``add(0, 5); add(5, 9)`` holds one interval.
    The lists stay short (one entry per hole), so `bisect` plus a slice
    assignment is cheaper than any tree.
    """

    __slots__ = ("_ends", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        """The number of intervals (not of integers)."""
        return len(self._starts)

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        i = bisect_right(self._starts, value) - 1
        return i >= 0 and value < self._ends[i]

    def __repr__(self) -> str:
        return f"_RangeSet({self.ranges()!r})"

    def ranges(self) -> list[tuple[int, int]]:
        """A copy of the intervals, lowest first."""
        return list(zip(self._starts, self._ends, strict=True))

    def inclusive_descending(self) -> tuple[tuple[int, int], ...]:
        """The intervals as inclusive ``(first, last)`` pairs, highest first (ACK order)."""
        starts, ends = self._starts, self._ends
        if len(starts) == 1:  # nothing missing, as on most paths: no generator
            return ((starts[0], ends[0] - 1),)
        return tuple((starts[i], ends[i] - 1) for i in range(len(starts) - 1, -1, -1))

    def total(self) -> int:
        """How many integers the set holds."""
        return sum(self._ends) - sum(self._starts)

    def first(self) -> tuple[int, int] | None:
        """The lowest interval, or None when empty."""
        return (self._starts[0], self._ends[0]) if self._starts else None

    def pop_first(self) -> tuple[int, int]:
        """Remove and return the lowest interval (IndexError when empty)."""
        return self._starts.pop(0), self._ends.pop(0)

    def add(self, start: int, end: int) -> None:
        """Add ``[start, end)``, merging with every interval it overlaps or touches."""
        if start >= end:
            return
        starts, ends = self._starts, self._ends
        if not starts or start > ends[-1]:
            starts.append(start)
            ends.append(end)
            return
        if start >= starts[-1]:  # extends the last interval: the common in-order case
            if end > ends[-1]:
                ends[-1] = end
            return
        i = bisect_left(ends, start)  # first interval ending at or after start
        j = bisect_right(starts, end)  # past the last interval starting at or before end
        if i == j:
            starts.insert(i, start)
            ends.insert(i, end)
            return
        starts[i:j] = [min(start, starts[i])]
        ends[i:j] = [max(end, ends[j - 1])]

    def remove(self, start: int, end: int) -> None:
        """Remove ``[start, end)``, splitting an interval that straddles either edge."""
        if start >= end:
            return
        starts, ends = self._starts, self._ends
        i = bisect_right(ends, start)  # first interval ending after start
        j = bisect_left(starts, end)  # past the last interval starting before end
        if i >= j:
            return
        new_starts: list[int] = []
        new_ends: list[int] = []
        if starts[i] < start:
            new_starts.append(starts[i])
            new_ends.append(start)
        if ends[j - 1] > end:
            new_starts.append(end)
            new_ends.append(ends[j - 1])
        starts[i:j] = new_starts
        ends[i:j] = new_ends

    def contains(self, start: int, end: int) -> bool:
        """True when all of ``[start, end)`` is in the set (an empty range always is)."""
        if start >= end:
            return True
        i = bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` not in the set, lowest first."""
        starts, ends = self._starts, self._ends
        out: list[tuple[int, int]] = []
        pos = start
        i = bisect_right(ends, start)
        n = len(starts)
        while i < n and starts[i] < end:
            if starts[i] > pos:
                out.append((pos, starts[i]))
            pos = max(pos, ends[i])
            i += 1
        if pos < end:
            out.append((pos, end))
        return out


class SendBuffer:
    """Bytes the application wrote, until the peer acknowledged them.

    Memory is one `bytearray` holding offsets ``[acked prefix, written)``;
    an acknowledgement that extends the acked prefix trims it from the front
    (O(1) in CPython). Lost and out-of-order-acked ranges are `_RangeSet`s.
    """

    __slots__ = (
        "_acked",
        "_base",
        "_buf",
        "_fin",
        "_fin_acked",
        "_fin_lost",
        "_fin_sent",
        "_lost",
        "_reset",
        "_sent",
        "_written",
    )

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0  # every byte below is acknowledged; _buf[0] is this offset
        self._written = 0
        self._sent = 0  # highest offset ever sent
        self._lost = _RangeSet()  # to re-send; always within [_base, _sent)
        self._acked = _RangeSet()  # acknowledged out of order; always above _base
        self._fin = False
        self._fin_sent = False
        self._fin_lost = False
        self._fin_acked = False
        self._reset = False

    def write(self, data: bytes) -> None:
        """Queue `data` after everything written so far."""
        if self._fin or self._reset:
            state = "reset" if self._reset else "finished"
            raise LocalProtocolError(f"cannot write to a stream whose sending side is {state}")
        self._buf += data
        self._written += len(data)

    def finish(self) -> None:
        """Queue the FIN after all data written so far (idempotent)."""
        if self._reset:
            raise LocalProtocolError("cannot finish a stream whose sending side is reset")
        self._fin = True

    @property
    def buffered(self) -> int:
        """Bytes written but not yet acknowledged: what backpressure should count."""
        return self._written - self._base - self._acked.total()

    @property
    def unsent(self) -> int:
        """Bytes never sent yet (retransmissions not included)."""
        return self._written - self._sent

    @property
    def highest_sent(self) -> int:
        """Highest offset ever sent: the stream's share of flow control, its final size on reset."""
        return self._sent

    @property
    def has_pending_retransmit(self) -> bool:
        """True when lost data or a lost FIN waits to be sent again."""
        return bool(self._lost) or (self._fin_lost and not self._fin_acked)

    @property
    def has_pending(self) -> bool:
        """True when `next_frame` has something to send, flow control permitting."""
        return self._written > self._sent or self.has_pending_retransmit or self._fin_due()

    @property
    def fin_acked(self) -> bool:
        return self._fin_acked

    @property
    def all_acked(self) -> bool:
        """Every byte and the FIN acknowledged (never true after `reset`)."""
        return self._fin_acked and self._base == self._written and not self._reset

    @property
    def delivered(self) -> int:
        """Bytes from offset 0 that the peer acknowledged, all of them."""
        return self._base

    @property
    def delivering(self) -> bool:
        """Written bytes or a FIN not yet acknowledged (and not abandoned by a reset)."""
        return not self._reset and (self.buffered > 0 or (self._fin and not self._fin_acked))

    def replayable(self) -> tuple[bytes, bool] | None:
        """Everything written and whether it ends with a FIN, if the peer acknowledged none of it.

        After a peer restart such a stream can be opened again on the new
        connection without the application noticing: the peer never saw it.
        """
        if self._reset or self._base or self._acked or self._fin_acked:
            return None
        return bytes(self._buf), self._fin

    def _fin_due(self) -> bool:
        return self._fin and not self._fin_acked and (self._fin_lost or not self._fin_sent)

    def _slice(self, start: int, end: int) -> bytes:
        lo = start - self._base
        with memoryview(self._buf) as view:
            return bytes(view[lo : lo + end - start])

    def next_frame(self, max_data: int, flow_limit: int) -> tuple[int, bytes, bool] | None:
        """``(offset, data, fin)`` for the next STREAM frame, or None when nothing can go.

        Lost ranges go first and ignore `flow_limit` (they lie below
        `highest_sent`, so the peer already granted them); new data is capped
        by both `max_data` and the absolute offset `flow_limit`. With
        ``max_data == 0`` only a bare FIN can go.
        """
        if self._reset:
            return None
        max_data = max(max_data, 0)
        first = self._lost.first() if max_data else None
        if first is not None:
            start = first[0]
            end = min(first[1], start + max_data)
            self._lost.remove(start, end)
            return start, self._slice(start, end), self._take_fin(end)
        start = self._sent
        end = min(self._written, start + max_data, max(flow_limit, start))
        if end > start:
            self._sent = end
            return start, self._slice(start, end), self._take_fin(end)
        if start == self._written and self._take_fin(start):
            return start, b"", True
        return None

    def _take_fin(self, end: int) -> bool:
        if end == self._written and self._fin_due():
            self._fin_sent = True
            self._fin_lost = False
            return True
        return False

    def on_acked(self, offset: int, length: int, fin: bool) -> None:
        """The peer received ``[offset, offset + length)`` (and the FIN): idempotent."""
        if self._reset:
            return
        if fin:
            self._fin_acked = True
            self._fin_lost = False
        start = max(offset, self._base)
        end = min(offset + length, self._sent)
        if start >= end:
            return
        self._lost.remove(start, end)
        self._acked.add(start, end)
        first = self._acked.first()
        if first is not None and first[0] == self._base:
            self._acked.pop_first()
            del self._buf[: first[1] - self._base]
            self._base = first[1]

    def on_lost(self, offset: int, length: int, fin: bool) -> None:
        """A frame carrying ``[offset, offset + length)`` was lost: re-send its unacked parts."""
        if self._reset:
            return
        if fin and self._fin_sent and not self._fin_acked:
            self._fin_lost = True
        start = max(offset, self._base)
        end = min(offset + length, self._sent)
        if start >= end:
            return
        for lo, hi in self._acked.missing(start, end):
            self._lost.add(lo, hi)

    def reset(self) -> int:
        """Abandon the stream (RESET_STREAM): drop all data, return the final size.

        The final size is `highest_sent`, the amount of data the peer may have
        seen (RFC 9000 §4.5). Idempotent.
        """
        self._reset = True
        self._buf = bytearray()
        self._lost = _RangeSet()
        self._acked = _RangeSet()
        self._base = self._written = self._sent
        return self._sent


class RecvBuffer:
    """Reassembles out-of-order STREAM data into an in-order byte stream.

    Holds only bytes not yet read: a deque of contiguous chunks ready to read
    and, for data past a hole, non-overlapping chunks keyed by offset.
    Duplicate ranges are dropped on arrival, never stored twice.
    """

    __slots__ = (
        "_final",
        "_highest",
        "_pending",
        "_pending_bytes",
        "_pending_ranges",
        "_read",
        "_ready",
        "_ready_len",
        "_reset",
    )

    def __init__(self) -> None:
        self._ready: deque[bytes | memoryview] = deque()  # starts at offset _read
        self._ready_len = 0
        self._read = 0
        self._pending: dict[int, bytes] = {}  # offset -> chunk, all past _read + _ready_len
        self._pending_ranges = _RangeSet()  # exactly the offsets the chunks cover
        self._pending_bytes = 0
        self._highest = 0
        self._final: int | None = None
        self._reset = False

    @property
    def readable(self) -> int:
        """Bytes `read` can return now."""
        return self._ready_len

    @property
    def eof(self) -> bool:
        """All bytes up to the final size have been read (never true after `reset`)."""
        return self._final is not None and self._read == self._final and not self._reset

    @property
    def final_size(self) -> int | None:
        return self._final

    @property
    def highest_received(self) -> int:
        """Highest offset received (the final size, once reset)."""
        return self._highest

    @property
    def read_offset(self) -> int:
        """Bytes handed to the application so far."""
        return self._read

    @property
    def buffered(self) -> int:
        """Bytes held in memory: readable plus out-of-order."""
        return self._ready_len + self._pending_bytes

    def _check_final(self, end: int, fin: bool) -> None:
        if fin:
            if self._final is not None and end != self._final:
                raise FlowControlError(
                    f"final size changed from {self._final} to {end} (second different final size)"
                )
            if end < self._highest:
                raise FlowControlError(
                    f"final size {end} is below data already received up to offset {self._highest}"
                )
        elif self._final is not None and end > self._final:
            raise FlowControlError(f"data up to offset {end} is past the final size {self._final}")

    def add(self, offset: int, data: bytes, fin: bool) -> int:
        """Take one STREAM frame; return the bytes it added past the highest offset received.

        Overlapping data is assumed consistent and not compared. Raises
        `FlowControlError` for data past a known final size, a second,
        different final size, or a final size below data already received.
        """
        end = offset + len(data)
        self._check_final(end, fin)
        if fin:
            self._final = end
        added = end - self._highest
        if added > 0:
            self._highest = end
        else:
            added = 0
        ready_end = self._read + self._ready_len
        if end <= ready_end or self._reset:
            return added
        if offset <= ready_end:
            self._append(data if offset == ready_end else memoryview(data)[ready_end - offset :])
            if self._pending:
                self._drain_pending()
            return added
        for lo, hi in self._pending_ranges.missing(offset, end):
            piece = data if hi - lo == len(data) else data[lo - offset : hi - offset]
            self._pending[lo] = piece
            self._pending_ranges.add(lo, hi)
            self._pending_bytes += hi - lo
        return added

    def _append(self, chunk: bytes | memoryview) -> None:
        self._ready.append(chunk)
        self._ready_len += len(chunk)

    def _drain_pending(self) -> None:
        """Move out-of-order chunks the ready data now reaches into the ready queue."""
        ranges = self._pending_ranges
        pending = self._pending
        while True:
            ready_end = self._read + self._ready_len
            first = ranges.first()
            if first is None or first[0] > ready_end:
                return
            start, end = ranges.pop_first()
            pos = start
            while pos < end:  # chunks tile the interval back to back
                chunk = pending.pop(pos)
                self._pending_bytes -= len(chunk)
                chunk_end = pos + len(chunk)
                if chunk_end > ready_end:
                    skip = ready_end - pos
                    self._append(memoryview(chunk)[skip:] if skip > 0 else chunk)
                    ready_end = chunk_end
                pos = chunk_end

    def read(self, max_bytes: int = -1) -> bytes:
        """Up to `max_bytes` (all when negative) contiguous bytes from `read_offset`."""
        if max_bytes < 0 or max_bytes >= self._ready_len:
            max_bytes = self._ready_len
        if max_bytes == 0:
            return b""
        ready = self._ready
        parts: list[bytes | memoryview] = []
        need = max_bytes
        while need:
            chunk = ready.popleft()
            if len(chunk) > need:
                view = memoryview(chunk)
                parts.append(view[:need])
                ready.appendleft(view[need:])
                break
            parts.append(chunk)
            need -= len(chunk)
        self._ready_len -= max_bytes
        self._read += max_bytes
        if len(parts) == 1 and type(parts[0]) is bytes:
            return parts[0]
        return b"".join(parts)

    def reset(self, final_size: int) -> None:
        """The peer reset the stream: check `final_size` as a FIN would, drop all data.

        Afterwards `highest_received` equals `final_size`, so the caller can
        charge the difference to connection flow control (RFC 9000 §4.5).
        """
        self._check_final(final_size, True)
        self._final = final_size
        self._highest = final_size
        self._reset = True
        self._ready.clear()
        self._ready_len = 0
        self._pending.clear()
        self._pending_ranges = _RangeSet()
        self._pending_bytes = 0


class FlowWindow:
    """Receive-side credit for one stream or the whole tunnel, auto-tuned.

    We advertise ``limit = consumed + window``. When the unused credit falls
    below half the window we advertise a new limit; if the previous update
    was less than two RTTs ago the window was the bottleneck, so it doubles
    (up to `maximum`), as in quic-go and Chromium.
    """

    __slots__ = ("_last_update", "_limit", "_maximum", "_window")

    def __init__(self, initial: int, *, maximum: int) -> None:
        if initial < 0:
            raise ValueError(f"initial window must be >= 0, got {initial}")
        self._window = initial
        self._maximum = max(maximum, initial)
        self._limit = initial
        self._last_update: float | None = None

    @property
    def limit(self) -> int:
        """Highest offset the peer may send up to: what we advertised."""
        return self._limit

    @property
    def window(self) -> int:
        """Current window size (grows by auto-tuning)."""
        return self._window

    def on_received(self, highest_offset: int) -> None:
        """Check that the peer stayed within the credit we gave it."""
        if highest_offset > self._limit:
            raise FlowControlError(
                f"peer sent data up to offset {highest_offset}, past the advertised limit "
                f"{self._limit}"
            )

    def on_consumed(self, consumed_total: int, now: float, rtt: float) -> int | None:
        """The application has read `consumed_total` bytes; a new limit to advertise, or None."""
        if (self._limit - consumed_total) * 2 >= self._window:
            return None
        last = self._last_update
        if last is not None and now - last < _AUTOTUNE_RTTS * rtt:
            self._window = min(self._window * 2, self._maximum)
        self._last_update = now
        new_limit = consumed_total + self._window
        if new_limit <= self._limit:
            return None
        self._limit = new_limit
        return new_limit


class SendCredit:
    """Send-side view of the peer's limit for one stream or the tunnel."""

    __slots__ = ("_limit",)

    def __init__(self, limit: int) -> None:
        self._limit = limit

    @property
    def limit(self) -> int:
        """Highest offset (or connection total) the peer lets us send up to."""
        return self._limit

    def update(self, new_limit: int) -> bool:
        """Apply a MAX_DATA / MAX_STREAM_DATA value; True if the limit grew.

        Limits only grow: a smaller value is a stale, reordered update.
        """
        if new_limit > self._limit:
            self._limit = new_limit
            return True
        return False

    def available(self, used: int) -> int:
        """Credit left after `used` bytes (never negative)."""
        return max(self._limit - used, 0)


def stream_id_parity(local_key: bytes, remote_key: bytes) -> int:
    """The parity of the stream ids we open: 0 (even) for the lower static key, else 1.

    Keys compare as big-endian integers, so both sides agree without talking.
    Equal keys cannot be told apart, so they are refused.
    """
    if len(local_key) != len(remote_key):
        raise LocalProtocolError(
            f"static keys differ in length ({len(local_key)} and {len(remote_key)} bytes)"
        )
    if local_key == remote_key:
        raise LocalProtocolError("local and remote static keys are equal: stream ids would clash")
    return 0 if local_key < remote_key else 1


def is_local_stream(stream_id: int, parity: int) -> bool:
    """True when `stream_id` belongs to the side whose ids have `parity`."""
    return stream_id & 1 == parity
