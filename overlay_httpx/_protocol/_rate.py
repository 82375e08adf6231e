"""Delivery-rate estimation and a windowed max filter, the measurements BBR runs on.

`DeliveryRateEstimator` follows draft-cheng-iccrg-delivery-rate-estimation:
each in-flight packet is stamped at send time with how much the connection
had delivered by then, and when; an ACK turns the newest acknowledged
packet's stamp into a sample "bytes delivered / time taken" over one flight.
Taking the longer of the send and the ACK interval keeps a sample from
exceeding the rate at which packets actually left the bottleneck (ACK
compression) or left the sender.

Samples taken while the application, not the network, limited the sender
are flagged: they say "at least this fast", never "at most". The sender
marks the start of such a *bubble* with `mark_app_limited`; packets sent
until everything in flight at that moment is delivered carry the flag.

`WindowedMaxFilter` keeps the maximum over the last N units of a
monotonic clock (BBR uses round trips) in a small monotonic deque.
`RoundLoss` counts one round trip's deliveries and losses and tells
congestion from noise.

Nothing here reads a clock: every time comes in as ``now``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._fastinit import fast_frozen_init

if TYPE_CHECKING:
    from ._recovery import SentPacket

__all__ = ["DeliveryRateEstimator", "RateSample", "RoundLoss", "WindowedMaxFilter"]


@fast_frozen_init
@dataclass(frozen=True, slots=True)
class RateSample:
    """What one ACK says about the delivery rate (draft §3.3)."""

    delivered: int  # bytes delivered between the newest acked packet's send and now
    interval: float  # seconds those bytes took: max(send interval, ack interval)
    prior_delivered: int  # the connection's delivered count when that packet was sent
    is_app_limited: bool  # that packet was sent inside an application-limited bubble
    delivery_rate: float | None  # delivered / interval; None when the interval is unreliable


class DeliveryRateEstimator:
    """Per-connection delivery counters and the per-packet snapshot (draft §3.1, §3.2).

    Call `on_packet_sent` for every in-flight packet as it leaves (with the
    bytes in flight *before* it) and `on_packets_acked` for every batch of
    newly acknowledged packets; lost packets need nothing, they simply never
    count as delivered.
    """

    __slots__ = ("_app_limited_until", "delivered", "delivered_time", "first_sent_time")

    delivered: int
    delivered_time: float
    first_sent_time: float
    _app_limited_until: int

    def __init__(self) -> None:
        self.delivered = 0
        self.delivered_time = 0.0
        self.first_sent_time = 0.0
        self._app_limited_until = 0

    @property
    def app_limited(self) -> bool:
        """Whether packets sent now fall inside an application-limited bubble."""
        return self._app_limited_until != 0

    def mark_app_limited(self, bytes_in_flight: int) -> None:
        """The sender had room to send but nothing to send (draft §3.4).

        The bubble lasts until the bytes in flight now are delivered too; a
        value of 1 stands for "delivered so far" when nothing is in flight,
        since 0 means "no bubble".
        """
        self._app_limited_until = (self.delivered + bytes_in_flight) or 1

    def on_packet_sent(self, packet: SentPacket | None, bytes_in_flight: int, now: float) -> None:
        """Stamp `packet` as it leaves at `now`; `bytes_in_flight` excludes it.

        After an idle period (nothing in flight) both sampling clocks restart
        at `now`, so the next sample does not stretch over the silence.
        """
        if bytes_in_flight == 0:
            self.first_sent_time = now
            self.delivered_time = now
        if packet is not None:
            packet.first_sent_time = self.first_sent_time
            packet.delivered_time = self.delivered_time
            packet.delivered = self.delivered
            packet.is_app_limited = self._app_limited_until != 0

    def on_packets_acked(
        self, packets: Sequence[SentPacket], now: float, min_rtt: float | None
    ) -> RateSample | None:
        """Count newly acknowledged `packets` (ascending) as delivered; the sample they give.

        The sample comes from the most recently sent stamped packet among
        them; None when none was stamped. Its `delivery_rate` is None when
        the interval is shorter than `min_rtt` (or zero): such intervals come
        from ACK compression or spurious retransmissions and overestimate.
        """
        newest: SentPacket | None = None
        delivered = self.delivered
        for p in packets:
            if not p.in_flight:
                continue
            delivered += p.size
            if p.first_sent_time is not None:
                newest = p  # ascending packet number is ascending send order
        if delivered == self.delivered:
            return None
        self.delivered = delivered
        self.delivered_time = now
        if self._app_limited_until and delivered > self._app_limited_until:
            self._app_limited_until = 0
        if newest is None:
            return None
        first_sent = newest.first_sent_time
        assert first_sent is not None
        self.first_sent_time = newest.time_sent
        send_elapsed = newest.time_sent - first_sent
        ack_elapsed = now - newest.delivered_time
        interval = send_elapsed if send_elapsed > ack_elapsed else ack_elapsed
        sample_delivered = delivered - newest.delivered
        rate: float | None = None
        if interval > 0.0 and (min_rtt is None or interval >= min_rtt):
            rate = sample_delivered / interval
        return RateSample(
            delivered=sample_delivered,
            interval=interval,
            prior_delivered=newest.delivered,
            is_app_limited=newest.is_app_limited,
            delivery_rate=rate,
        )

    def __repr__(self) -> str:
        return (
            f"DeliveryRateEstimator(delivered={self.delivered}, "
            f"delivered_time={self.delivered_time}, app_limited={self.app_limited})"
        )


class WindowedMaxFilter:
    """The largest sample seen in the last `window` ticks of a monotonic clock.

    A sample taken at tick ``t`` counts while the current tick is below
    ``t + window``. The deque holds (tick, value) with values strictly
    decreasing from front to back: a sample is dropped as soon as a larger
    or equal one arrives that will outlive it, so at most ``window + 1``
    entries remain and `update` is amortised O(1).
    """

    __slots__ = ("_samples", "window")

    window: int
    _samples: deque[tuple[int, float]]

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self._samples = deque()

    def update(self, value: float, tick: int) -> None:
        """Add `value` observed at `tick` (ticks never decrease)."""
        samples = self._samples
        if samples and samples[-1][0] == tick and samples[-1][1] >= value:
            return  # same tick, not larger: it would expire together with the larger one
        while samples and samples[-1][1] <= value:
            samples.pop()
        samples.append((tick, value))
        self.expire(tick)

    def expire(self, tick: int) -> None:
        """Forget samples older than the window as of `tick`."""
        samples = self._samples
        oldest = tick - self.window
        while samples and samples[0][0] <= oldest:
            samples.popleft()

    def get(self) -> float:
        """The windowed maximum; 0.0 before any sample."""
        samples = self._samples
        return samples[0][1] if samples else 0.0

    def reset(self) -> None:
        """Forget every sample."""
        self._samples.clear()

    def __repr__(self) -> str:
        return f"WindowedMaxFilter(window={self.window}, max={self.get()})"


class RoundLoss:
    """Bytes and packets acknowledged and lost during one round trip.

    `close` judges the round and starts the next. A loss rate is noisy on
    small rounds (one loss in 40 packets is 2.5 %), so a round only counts
    as congested when its loss is both above a threshold and well above
    what random loss at half that threshold would produce on that many
    packets.
    """

    __slots__ = ("acked_bytes", "acked_packets", "lost_bytes", "lost_packets")

    acked_bytes: int
    acked_packets: int
    lost_bytes: int
    lost_packets: int

    def __init__(self) -> None:
        self.acked_bytes = self.acked_packets = self.lost_bytes = self.lost_packets = 0

    def close(self, threshold: float, sigmas: float) -> tuple[bool, int]:
        """(congested, packets lost) for the round just ended; the counts restart at 0.

        Congested: more than `threshold` of the bytes lost, and more lost
        packets than ``threshold / 2`` of the round's packets plus `sigmas`
        standard deviations (Poisson) of that.
        """
        lost, packets = self.lost_bytes, self.lost_packets
        expected = 0.5 * threshold * (packets + self.acked_packets)
        congested = lost > threshold * (lost + self.acked_bytes) and packets > (
            expected + sigmas * math.sqrt(expected)
        )
        self.acked_bytes = self.acked_packets = self.lost_bytes = self.lost_packets = 0
        return congested, packets

    def __repr__(self) -> str:
        return (
            f"RoundLoss(acked={self.acked_packets} packets/{self.acked_bytes} B, "
            f"lost={self.lost_packets} packets/{self.lost_bytes} B)"
        )
