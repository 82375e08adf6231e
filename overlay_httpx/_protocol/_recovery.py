"""Loss detection and RTT estimation (RFC 9002 §5, §6, Appendix A), sans-IO.

The tunnel has one packet-number space and finishes its handshake elsewhere,
so the Initial/Handshake spaces, anti-amplification and the client's
anti-deadlock probes of RFC 9002 do not exist here; ``max_ack_delay`` always
counts towards the PTO.

`LossRecovery` only decides which packets were acknowledged or lost and when
to probe; re-sending the frames of lost packets in new packets is the
caller's job (each `SentPacket` carries its frames, opaque to this module).

Sent packets live in a dict keyed by packet number (for acknowledgements)
plus a deque in sending order (for loss detection, which only ever looks at
the oldest packets). Packets leave the dict as soon as they are acknowledged,
lost or discarded, and the deque is trimmed from the front lazily, so an ACK
costs O(newly acknowledged + newly lost), not O(packets in flight).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from .._exceptions import LocalProtocolError, RemoteProtocolError
from ._congestion import CongestionController, Pacer
from ._fastinit import fast_frozen_init

__all__ = [
    "GRANULARITY",
    "PACKET_THRESHOLD",
    "PERSISTENT_CONGESTION_THRESHOLD",
    "TIME_THRESHOLD",
    "AckResult",
    "LossRecovery",
    "RttEstimator",
    "SentPacket",
    "TimeoutResult",
]

PACKET_THRESHOLD: Final = 3
"""kPacketThreshold: a packet this many numbers below the largest acknowledged is lost."""

TIME_THRESHOLD: Final = 9 / 8
"""kTimeThreshold: a packet older than this many RTTs, with a later one acked, is lost."""

GRANULARITY: Final = 0.001
"""kGranularity (seconds): the timer resolution assumed for loss delay and PTO."""

PERSISTENT_CONGESTION_THRESHOLD: Final = 3
"""kPersistentCongestionThreshold: PTO periods (without backoff) of loss that collapse cwnd."""

_MAX_PTO_BACKOFF_EXPONENT: Final = 30  # 2**30 PTOs is years: stop doubling long before overflow

MAX_PTO_PERIOD: Final = 30.0
"""Backoff stops doubling the probe timeout here (seconds): after a long outage
the next probe still leaves well inside the 120 s idle timeout, so a path that
comes back is found again rather than given up for silence."""


@dataclass(slots=True)
class SentPacket:
    """One packet as sent; recovery reads every field except `frames`.

    `ack_eliciting` packets must also be `in_flight`. Ack-only packets are
    neither, and should still be registered so the peer's ACK of them (and
    the RTT sample they may carry) is recognised.

    The last four fields are the delivery-rate snapshot a rate-sampling
    congestion controller (`BBR`) stamps on in-flight packets when they are
    sent (draft-cheng-iccrg-delivery-rate-estimation §3.2); callers leave
    them at their defaults, and `first_sent_time` stays None on packets
    nobody stamped (NewReno, ack-only packets).
    """

    packet_number: int
    time_sent: float
    size: int  # bytes on the wire
    ack_eliciting: bool
    in_flight: bool
    frames: list[object] = field(default_factory=list)  # opaque; handed back on ack or loss
    delivered: int = 0  # bytes the connection had delivered when this packet was sent
    delivered_time: float = 0.0  # when that count was last raised
    first_sent_time: float | None = None  # send time of the packet opening its sampling flight
    is_app_limited: bool = False  # sent inside an application-limited bubble


class RttEstimator:
    """RFC 9002 §5: min, smoothed and variance of the round-trip time.

    Until the first sample `smoothed_rtt` is `initial_rtt` and `rttvar` half
    of it, as the RFC prescribes; `latest_rtt` and `min_rtt` are None. The
    default initial RTT is 100 ms rather than the RFC's 333 ms, which makes
    the first PTO needlessly slow on datacenter links.
    """

    __slots__ = ("_latest", "_min", "_rttvar", "_smoothed", "initial_rtt")

    initial_rtt: float
    _latest: float | None
    _min: float | None
    _smoothed: float
    _rttvar: float

    def __init__(self, initial_rtt: float = 0.1) -> None:
        if not initial_rtt > 0:
            raise ValueError(f"initial_rtt must be positive, got {initial_rtt}")
        self.initial_rtt = initial_rtt
        self._latest = None
        self._min = None
        self._smoothed = initial_rtt
        self._rttvar = initial_rtt / 2

    @property
    def latest_rtt(self) -> float | None:
        return self._latest

    @property
    def min_rtt(self) -> float | None:
        return self._min

    @property
    def smoothed_rtt(self) -> float:
        return self._smoothed

    @property
    def rttvar(self) -> float:
        return self._rttvar

    @property
    def has_sample(self) -> bool:
        return self._min is not None

    def update(self, latest_rtt: float, ack_delay: float, max_ack_delay: float) -> None:
        """Fold in one sample (RFC 9002 §5.3).

        `ack_delay` is what the peer reported, capped at its `max_ack_delay`;
        it is subtracted only when that does not take the sample below
        `min_rtt`. `min_rtt` itself ignores ack delay. The first sample sets
        everything directly and ignores `ack_delay`.
        """
        if latest_rtt < 0:
            raise ValueError(f"an RTT sample cannot be negative, got {latest_rtt}")
        self._latest = latest_rtt
        min_rtt = self._min
        if min_rtt is None:
            self._min = latest_rtt
            self._smoothed = latest_rtt
            self._rttvar = latest_rtt / 2
            return
        if latest_rtt < min_rtt:
            self._min = min_rtt = latest_rtt
        if ack_delay > max_ack_delay:
            ack_delay = max_ack_delay
        adjusted = latest_rtt
        if ack_delay > 0 and latest_rtt >= min_rtt + ack_delay:
            adjusted = latest_rtt - ack_delay
        smoothed = self._smoothed
        self._rttvar = 0.75 * self._rttvar + 0.25 * abs(smoothed - adjusted)
        self._smoothed = 0.875 * smoothed + 0.125 * adjusted

    def __repr__(self) -> str:
        return (
            f"RttEstimator(latest={self._latest}, min={self._min}, "
            f"smoothed={self._smoothed}, rttvar={self._rttvar})"
        )


@fast_frozen_init
@dataclass(frozen=True, slots=True)
class AckResult:
    """What one ACK frame changed."""

    acked: list[SentPacket]  # newly acknowledged, ascending packet number
    lost: list[SentPacket]  # declared lost as a consequence, ascending packet number
    rtt_sample: float | None  # the raw latest_rtt taken from this ACK, if any
    persistent_congestion: bool


@dataclass(frozen=True, slots=True)
class TimeoutResult:
    """What a loss-detection timer expiry asks of the caller."""

    lost: list[SentPacket]  # declared lost by the time threshold, ascending packet number
    probes: int  # ack-eliciting packets to send now, ignoring cwnd (0 unless a PTO fired)
    persistent_congestion: bool = False


class LossRecovery:
    """RFC 9002 loss detection for one packet-number space, driving a congestion controller.

    Drive it with `on_packet_sent` for every packet sent (ack-only ones
    included, in increasing packet-number order), `on_ack_received` for every
    ACK frame, and `on_loss_detection_timeout` whenever the time from
    `get_loss_detection_timer` arrives (early or repeated calls are harmless).
    Re-arm your timer from `get_loss_detection_timer` after each of them.

    `max_ack_delay` is the *peer's* maximum ACK delay (its transport
    parameter), in seconds. If a `Pacer` is given it is told about in-flight
    packets and its rate is refreshed after every ACK and timeout: the
    controller's `pacing_rate` when it has one (BBR), else derived from the
    window and smoothed RTT (NewReno).
    """

    __slots__ = (
        "_ack_eliciting_in_flight",
        "_cc",
        "_first_rtt_sample_time",
        "_largest_acked",
        "_largest_sent",
        "_loss_time",
        "_order",
        "_pacer",
        "_pto_count",
        "_rtt",
        "_sent",
        "_time_of_last_ack_eliciting",
        "max_ack_delay",
    )

    max_ack_delay: float
    _cc: CongestionController
    _pacer: Pacer | None
    _rtt: RttEstimator
    _sent: dict[int, SentPacket]
    _order: deque[SentPacket]
    _largest_sent: int
    _largest_acked: int | None
    _ack_eliciting_in_flight: int
    _time_of_last_ack_eliciting: float | None
    _loss_time: float | None
    _pto_count: int
    _first_rtt_sample_time: float | None

    def __init__(
        self,
        *,
        congestion: CongestionController,
        max_ack_delay: float = 0.025,
        initial_rtt: float = 0.1,
        pacer: Pacer | None = None,
    ) -> None:
        if max_ack_delay < 0:
            raise ValueError(f"max_ack_delay must not be negative, got {max_ack_delay}")
        self.max_ack_delay = max_ack_delay
        self._cc = congestion
        self._pacer = pacer
        self._rtt = RttEstimator(initial_rtt)
        self._sent = {}
        self._order = deque()
        self._largest_sent = -1
        self._largest_acked = None
        self._ack_eliciting_in_flight = 0
        self._time_of_last_ack_eliciting = None
        self._loss_time = None
        self._pto_count = 0
        self._first_rtt_sample_time = None
        if pacer is not None:
            pacer.update_rate(
                congestion.congestion_window, self._rtt.smoothed_rtt, congestion.pacing_rate
            )

    # -- views ----------------------------------------------------------------

    @property
    def rtt(self) -> RttEstimator:
        return self._rtt

    @property
    def congestion(self) -> CongestionController:
        return self._cc

    @property
    def pacer(self) -> Pacer | None:
        return self._pacer

    @property
    def pto_count(self) -> int:
        """Consecutive PTO expiries without an acknowledgement in between."""
        return self._pto_count

    @property
    def bytes_in_flight(self) -> int:
        return self._cc.bytes_in_flight

    @property
    def largest_acked(self) -> int | None:
        return self._largest_acked

    @property
    def largest_sent(self) -> int | None:
        return None if self._largest_sent < 0 else self._largest_sent

    @property
    def sent_packets_count(self) -> int:
        """Packets sent and still awaiting an acknowledgement or a loss verdict."""
        return len(self._sent)

    @property
    def ack_eliciting_in_flight(self) -> int:
        return self._ack_eliciting_in_flight

    def pto_interval(self) -> float:
        """The current probe timeout, exponential backoff included (RFC 9002 §6.2.1)."""
        rtt = self._rtt
        base = rtt.smoothed_rtt + max(4 * rtt.rttvar, GRANULARITY) + self.max_ack_delay
        backed_off = base * (1 << min(self._pto_count, _MAX_PTO_BACKOFF_EXPONENT))
        return min(backed_off, max(base, MAX_PTO_PERIOD))

    def get_loss_detection_timer(self) -> float | None:
        """When to call `on_loss_detection_timeout`: None means no timer.

        The earliest time-threshold loss if one is pending, else the PTO
        deadline while ack-eliciting packets are in flight.
        """
        if self._loss_time is not None:
            return self._loss_time
        last = self._time_of_last_ack_eliciting
        if not self._ack_eliciting_in_flight or last is None:
            return None
        return last + self.pto_interval()

    # -- events ---------------------------------------------------------------

    def on_packet_sent(self, packet: SentPacket) -> None:
        """Register a packet just sent (at ``packet.time_sent``)."""
        pn = packet.packet_number
        if pn <= self._largest_sent:
            raise LocalProtocolError(
                f"packet number {pn} sent after {self._largest_sent}: "
                "packet numbers must strictly increase"
            )
        if packet.ack_eliciting and not packet.in_flight:
            raise LocalProtocolError(f"packet {pn} is ack-eliciting but not in flight")
        self._largest_sent = pn
        self._sent[pn] = packet
        self._order.append(packet)
        if packet.in_flight:
            if packet.ack_eliciting:
                self._ack_eliciting_in_flight += 1
                self._time_of_last_ack_eliciting = packet.time_sent
            self._cc.on_packet_sent(packet.size, packet.time_sent, packet)
            pacer = self._pacer
            if pacer is not None:
                pacer.on_packet_sent(packet.time_sent, packet.size)

    def on_ack_received(
        self, ranges: Sequence[tuple[int, int]], ack_delay: float, now: float
    ) -> AckResult:
        """Process one ACK frame (RFC 9002 §A.7).

        `ranges` are inclusive ``(smallest, largest)`` pairs, descending by
        largest as the frame carries them; `ack_delay` is the decoded delay
        in seconds. Numbers already acknowledged, declared lost, or never
        registered are ignored; acknowledging a number above the largest
        ever sent raises `RemoteProtocolError`.
        """
        largest_sent = self._largest_sent
        frame_largest = -1
        prev_smallest: int | None = None
        descending = True
        for smallest, largest in ranges:
            if smallest < 0 or smallest > largest:
                raise RemoteProtocolError(
                    f"malformed ACK range ({smallest}, {largest}): "
                    "expected 0 <= smallest <= largest"
                )
            if largest > largest_sent:
                what = (
                    "no packet was sent" if largest_sent < 0 else f"largest sent is {largest_sent}"
                )
                raise RemoteProtocolError(
                    f"peer acknowledged packet {largest}, which was never sent ({what})"
                )
            if prev_smallest is not None and largest >= prev_smallest:
                descending = False
            prev_smallest = smallest
            if largest > frame_largest:
                frame_largest = largest
        if frame_largest < 0:
            return AckResult([], [], None, False)
        if self._largest_acked is None or frame_largest > self._largest_acked:
            self._largest_acked = frame_largest

        # Newly acknowledged packets, ascending. Nothing below the oldest
        # tracked packet can be new, so each range is clipped to start there.
        acked: list[SentPacket] = []
        floor = self._oldest_tracked()
        if floor is not None:
            pop = self._sent.pop
            append = acked.append
            for smallest, largest in reversed(ranges) if descending else sorted(ranges):
                for pn in range(smallest if smallest > floor else floor, largest + 1):
                    p = pop(pn, None)
                    if p is not None:
                        append(p)
        if not acked:
            return AckResult(acked, [], None, False)

        ack_eliciting = 0
        for p in acked:
            if p.ack_eliciting:
                ack_eliciting += 1
        self._ack_eliciting_in_flight -= ack_eliciting

        rtt_sample: float | None = None
        newest = acked[-1]
        if ack_eliciting and newest.packet_number == frame_largest:
            rtt_sample = now - newest.time_sent
            if rtt_sample < 0.0:
                rtt_sample = 0.0
            if self._first_rtt_sample_time is None:
                self._first_rtt_sample_time = now
            self._rtt.update(rtt_sample, ack_delay, self.max_ack_delay)

        lost = self._detect_lost(now)
        persistent = self._on_lost(lost, now) if lost else False
        self._cc.on_packets_acked(acked, now)
        self._pto_count = 0
        self._trim()
        self._refresh_pacer()
        return AckResult(acked, lost, rtt_sample, persistent)

    def on_loss_detection_timeout(self, now: float) -> TimeoutResult:
        """The loss-detection timer fired (RFC 9002 §A.9).

        A pending time-threshold loss is declared (``probes == 0``); otherwise,
        once the PTO deadline has passed, `pto_count` grows and the caller
        must send `probes` ack-eliciting packets now, even if the congestion
        window is full (new data if any, else retransmitted data, else PING).
        One probe on the first PTO, two on later ones. Calls before the
        deadline return an empty result and change nothing.
        """
        loss_time = self._loss_time
        if loss_time is not None:
            if now < loss_time:
                return TimeoutResult([], 0)
            lost = self._detect_lost(now)
            persistent = self._on_lost(lost, now) if lost else False
            self._trim()
            self._refresh_pacer()
            return TimeoutResult(lost, 0, persistent)
        deadline = self.get_loss_detection_timer()
        if deadline is None or now < deadline:
            return TimeoutResult([], 0)
        self._pto_count += 1
        return TimeoutResult([], 1 if self._pto_count == 1 else 2)

    def discard_all(self) -> list[SentPacket]:
        """Forget every tracked packet without an ack or loss verdict (tunnel reset).

        The congestion controller removes them from flight without reacting;
        the RTT estimate and congestion window are kept. Returns the packets,
        ascending, so the caller can decide what to do with their frames.
        """
        packets = list(self._sent.values())
        self._sent.clear()
        self._order.clear()
        self._cc.discard(packets)
        self._ack_eliciting_in_flight = 0
        self._time_of_last_ack_eliciting = None
        self._loss_time = None
        self._pto_count = 0
        return packets

    # -- internals ------------------------------------------------------------

    def _oldest_tracked(self) -> int | None:
        self._trim()
        order = self._order
        return order[0].packet_number if order else None

    def _trim(self) -> None:
        # Drop acknowledged/lost/discarded packets from the front of the deque.
        order = self._order
        sent = self._sent
        while order:
            p = order[0]
            if sent.get(p.packet_number) is p:
                return
            order.popleft()

    def _detect_lost(self, now: float) -> list[SentPacket]:
        # RFC 9002 §A.10. Only packets at or below the largest acknowledged
        # qualify, and those sit at the front of the deque.
        self._loss_time = None
        largest_acked = self._largest_acked
        lost: list[SentPacket] = []
        if largest_acked is None:
            return lost
        rtt = self._rtt
        latest = rtt.latest_rtt
        smoothed = rtt.smoothed_rtt
        loss_delay = TIME_THRESHOLD * (
            latest if latest is not None and latest > smoothed else smoothed
        )
        if loss_delay < GRANULARITY:
            loss_delay = GRANULARITY
        pn_limit = largest_acked - PACKET_THRESHOLD
        sent = self._sent
        loss_time: float | None = None
        for p in self._order:
            pn = p.packet_number
            if pn > largest_acked:
                break
            if sent.get(pn) is not p:
                continue
            # Compare as `time_sent + loss_delay <= now`, the same expression
            # the timer is armed with, so a timer firing exactly on time
            # always finds its packet lost despite float rounding.
            expiry = p.time_sent + loss_delay
            if pn <= pn_limit or expiry <= now:
                lost.append(p)
            elif loss_time is None or expiry < loss_time:
                loss_time = expiry
        self._loss_time = loss_time
        ack_eliciting = 0
        for p in lost:
            del sent[p.packet_number]
            if p.ack_eliciting:
                ack_eliciting += 1
        self._ack_eliciting_in_flight -= ack_eliciting
        return lost

    def _on_lost(self, lost: list[SentPacket], now: float) -> bool:
        self._cc.on_packets_lost(lost, now)
        if self._in_persistent_congestion(lost):
            self._cc.on_persistent_congestion(now)
            return True
        return False

    def _in_persistent_congestion(self, lost: list[SentPacket]) -> bool:
        # RFC 9002 §7.6: two ack-eliciting packets lost more than the
        # persistent-congestion duration apart, none acknowledged in between,
        # both sent after the first RTT sample. "None in between
        # acknowledged" is checked as contiguous packet numbers within this
        # batch of losses: a gap means something between was acknowledged
        # (or handled earlier), which conservatively restarts the run.
        first_sample = self._first_rtt_sample_time
        if first_sample is None or len(lost) < 2:
            return False
        rtt = self._rtt
        duration = (
            rtt.smoothed_rtt + max(4 * rtt.rttvar, GRANULARITY) + self.max_ack_delay
        ) * PERSISTENT_CONGESTION_THRESHOLD
        start: float | None = None
        prev_pn = -2
        for p in lost:
            pn = p.packet_number
            if pn != prev_pn + 1 or p.time_sent <= first_sample:
                start = None
            prev_pn = pn
            if not p.ack_eliciting or p.time_sent <= first_sample:
                continue
            if start is None:
                start = p.time_sent
            elif p.time_sent - start > duration:
                return True
        return False

    def _refresh_pacer(self) -> None:
        pacer = self._pacer
        if pacer is not None:
            cc = self._cc
            pacer.update_rate(cc.congestion_window, self._rtt.smoothed_rtt, cc.pacing_rate)

    def __repr__(self) -> str:
        return (
            f"LossRecovery(tracked={len(self._sent)}, largest_sent={self.largest_sent}, "
            f"largest_acked={self._largest_acked}, pto_count={self._pto_count}, "
            f"loss_time={self._loss_time})"
        )
