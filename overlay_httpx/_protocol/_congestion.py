"""Congestion control (RFC 9002 §7, Appendix B) and pacing (§7.7), sans-IO.

`LossRecovery` decides which packets were acknowledged or lost; a
`CongestionController` turns that into how many bytes may be in flight and,
optionally, how fast to send them. Two controllers implement it: `NewReno`
here (loss-based) and `BBR` in `_bbr.py` (model-based, tolerant of random
loss); `make_congestion_controller` picks one by name, as
`TunnelConfig.congestion_control` does. `Pacer` spreads a window's worth of
packets over a round trip so a full window does not leave as one burst that
overflows a router queue.

Nothing here reads a clock: every method that needs time takes ``now``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Literal, Protocol, get_args

from ._bbr import BBR

if TYPE_CHECKING:
    from ._recovery import SentPacket

__all__ = [
    "CONGESTION_CONTROLLERS",
    "LOSS_REDUCTION_FACTOR",
    "PACING_GAIN",
    "CongestionControl",
    "CongestionController",
    "NewReno",
    "Pacer",
    "make_congestion_controller",
]

CongestionControl = Literal["bbr", "newreno"]
"""Names `make_congestion_controller` (and `TunnelConfig.congestion_control`) accept."""

CONGESTION_CONTROLLERS: Final[tuple[str, ...]] = get_args(CongestionControl)

LOSS_REDUCTION_FACTOR: Final = 0.5
"""kLossReductionFactor: the window is halved on each congestion event."""

PACING_GAIN: Final = 1.25
"""N in RFC 9002 §7.7: pace slightly faster than cwnd/srtt so pacing never limits."""

_INITIAL_WINDOW_CAP: Final = 14720
_MIN_SRTT: Final = 1e-6  # floor for divisions: loopback RTTs can be tens of microseconds
_TOKEN_SLACK: Final = 1e-6  # bytes; absorbs float rounding so a returned send time is honoured
_MIN_RATE: Final = 1  # bytes/s; a controller's rate of 0 must not divide by zero or stall forever


class CongestionController(Protocol):
    """What `LossRecovery` needs from a congestion controller.

    Only packets with ``in_flight`` set count towards `bytes_in_flight`; the
    controller filters the sequences it is given itself, so callers may pass
    acknowledged or lost packets unfiltered.
    """

    @property
    def congestion_window(self) -> int:
        """Bytes that may be in flight at once."""
        ...

    @property
    def bytes_in_flight(self) -> int:
        """Bytes of sent, in-flight packets neither acknowledged, lost nor discarded."""
        ...

    @property
    def pacing_rate(self) -> float | None:
        """Bytes per second to pace at, or None to let the `Pacer` derive it from cwnd/srtt."""
        ...

    def on_packet_sent(self, size: int, now: float, packet: SentPacket | None = None) -> None:
        """An in-flight packet of `size` bytes left at `now`.

        `packet`, when given, is that packet; a controller that samples the
        delivery rate stamps its snapshot fields. `LossRecovery` always
        passes it.
        """
        ...

    def on_packets_acked(self, packets: Sequence[SentPacket], now: float) -> None:
        """`packets` (ascending packet number) were newly acknowledged."""
        ...

    def on_packets_lost(self, packets: Sequence[SentPacket], now: float) -> None:
        """`packets` (ascending packet number) were declared lost: a congestion event."""
        ...

    def on_persistent_congestion(self, now: float) -> None:
        """RFC 9002 §7.6 established persistent congestion (after `on_packets_lost`)."""
        ...

    def discard(self, packets: Sequence[SentPacket]) -> None:
        """Forget `packets` without treating them as acknowledged or lost (keys dropped)."""
        ...

    def set_app_limited(self, app_limited: bool) -> None:
        """The sender ran out of data before it ran out of window (True), or not."""
        ...

    def can_send(self, size: int) -> bool:
        """Whether a packet of `size` bytes fits in the window now."""
        ...


class NewReno:
    """RFC 9002 §7 / Appendix B NewReno: slow start, congestion avoidance, recovery.

    * Slow start: every acknowledged byte grows the window by one byte, which
      doubles it per round trip, until `ssthresh`.
    * Congestion avoidance: about one `max_datagram_size` per window's worth
      of acknowledged bytes, i.e. one datagram per round trip. Fractional
      growth is carried in an integer byte counter so the window stays an int.
    * Recovery: a loss halves the window once. Losses or acknowledgements of
      packets sent at or before `recovery_start_time` neither reduce nor grow
      the window again; the period ends when a packet sent after it is acked.
    * Persistent congestion collapses the window to `minimum_window`.

    Application-limited senders must not grow the window on acknowledgements
    that say nothing about the path's capacity (RFC 9002 §7.8). Two checks
    apply, both must pass for the window to grow:

    * the caller's flag, `set_app_limited` (default False): set it True when
      the send loop stops because it has nothing to send while `can_send`
      still allowed more, and False again when the window is what stops it;
    * a built-in heuristic, so a caller that never sets the flag still
      behaves: the bytes in flight just before an acknowledgement is
      processed must be at least half the window.
    """

    __slots__ = (
        "_ca_bytes_acked",
        "_ssthresh",
        "app_limited",
        "bytes_in_flight",
        "congestion_window",
        "initial_window",
        "max_datagram_size",
        "minimum_window",
        "recovery_start_time",
    )

    congestion_window: int
    bytes_in_flight: int
    max_datagram_size: int
    initial_window: int
    minimum_window: int
    recovery_start_time: float | None
    app_limited: bool
    _ssthresh: int | None
    _ca_bytes_acked: int

    def __init__(
        self,
        *,
        max_datagram_size: int = 1200,
        initial_window: int | None = None,
        minimum_window: int | None = None,
    ) -> None:
        if max_datagram_size <= 0:
            raise ValueError(f"max_datagram_size must be positive, got {max_datagram_size}")
        if initial_window is None:
            initial_window = min(
                10 * max_datagram_size, max(_INITIAL_WINDOW_CAP, 2 * max_datagram_size)
            )
        if minimum_window is None:
            minimum_window = 2 * max_datagram_size
        if minimum_window <= 0:
            raise ValueError(f"minimum_window must be positive, got {minimum_window}")
        if initial_window < minimum_window:
            raise ValueError(
                f"initial_window {initial_window} is below minimum_window {minimum_window}"
            )
        self.max_datagram_size = max_datagram_size
        self.initial_window = initial_window
        self.minimum_window = minimum_window
        self.congestion_window = initial_window
        self.bytes_in_flight = 0
        self.recovery_start_time = None
        self.app_limited = False
        self._ssthresh = None
        self._ca_bytes_acked = 0

    # -- views ----------------------------------------------------------------

    @property
    def ssthresh(self) -> int | None:
        """Slow-start threshold in bytes; None (infinite) until the first congestion event."""
        return self._ssthresh

    @property
    def in_slow_start(self) -> bool:
        return self._ssthresh is None or self.congestion_window < self._ssthresh

    def in_recovery(self, time_sent: float) -> bool:
        """Whether a packet sent at `time_sent` belongs to the current recovery period."""
        start = self.recovery_start_time
        return start is not None and time_sent <= start

    def can_send(self, size: int) -> bool:
        return self.bytes_in_flight + size <= self.congestion_window

    # -- events ---------------------------------------------------------------

    @property
    def pacing_rate(self) -> None:
        """Always None: the pacer derives NewReno's rate from cwnd and srtt."""
        return None

    def set_app_limited(self, app_limited: bool) -> None:
        self.app_limited = app_limited

    def on_packet_sent(self, size: int, now: float, packet: SentPacket | None = None) -> None:
        self.bytes_in_flight += size

    def on_packets_acked(self, packets: Sequence[SentPacket], now: float) -> None:
        flight_before = self.bytes_in_flight
        start = self.recovery_start_time
        removed = 0
        growth = 0
        for p in packets:
            if not p.in_flight:
                continue
            removed += p.size
            if start is None or p.time_sent > start:
                growth += p.size
        if not removed:
            return
        self.bytes_in_flight = max(0, flight_before - removed)
        cwnd = self.congestion_window
        # Grow only when the window, not the application, limited the sender.
        if not growth or self.app_limited or 2 * flight_before < cwnd:
            return
        ssthresh = self._ssthresh
        if ssthresh is None or cwnd < ssthresh:
            room = growth if ssthresh is None else min(growth, ssthresh - cwnd)
            cwnd += room
            growth -= room
        if growth:
            # Congestion avoidance: + max_datagram_size per cwnd bytes acknowledged.
            acc = self._ca_bytes_acked + growth
            if acc >= cwnd:
                steps = acc // cwnd
                acc -= steps * cwnd
                cwnd += steps * self.max_datagram_size
            self._ca_bytes_acked = acc
        self.congestion_window = cwnd

    def on_packets_lost(self, packets: Sequence[SentPacket], now: float) -> None:
        removed = 0
        last_sent: float | None = None
        for p in packets:
            if not p.in_flight:
                continue
            removed += p.size
            if last_sent is None or p.time_sent > last_sent:
                last_sent = p.time_sent
        if last_sent is None:
            return
        self.bytes_in_flight = max(0, self.bytes_in_flight - removed)
        self._on_congestion_event(last_sent, now)

    def on_persistent_congestion(self, now: float) -> None:
        self.congestion_window = self.minimum_window
        self.recovery_start_time = None
        self._ca_bytes_acked = 0

    def discard(self, packets: Sequence[SentPacket]) -> None:
        removed = sum(p.size for p in packets if p.in_flight)
        self.bytes_in_flight = max(0, self.bytes_in_flight - removed)

    def _on_congestion_event(self, time_sent: float, now: float) -> None:
        # One reduction per recovery period: packets sent before it started
        # were sent at the old rate and their loss is already accounted for.
        start = self.recovery_start_time
        if start is not None and time_sent <= start:
            return
        self.recovery_start_time = now
        ssthresh = int(self.congestion_window * LOSS_REDUCTION_FACTOR)
        self._ssthresh = ssthresh
        self.congestion_window = max(ssthresh, self.minimum_window)
        self._ca_bytes_acked = 0

    def __repr__(self) -> str:
        return (
            f"NewReno(cwnd={self.congestion_window}, in_flight={self.bytes_in_flight}, "
            f"ssthresh={self._ssthresh}, recovery_start={self.recovery_start_time})"
        )


class Pacer:
    """Token-bucket pacing at ``PACING_GAIN * cwnd / srtt`` bytes per second.

    (Or at the rate the congestion controller asks for, if it has one: see
    `update_rate`.)

    The bucket starts full, so the first `burst_packets` datagrams leave at
    once. Its capacity is the larger of that burst and what the rate sends in
    one `timer_granularity`: an event loop cannot sleep for less than about
    a millisecond, so pacing finer than that would only cost wake-ups.

    Pacing switches itself off whenever the whole window drains within one
    timer granularity (short RTTs, e.g. loopback): there the window already
    bounds every burst, and sub-millisecond delays cannot be honoured. Until
    `update_rate` is first called the pacer never delays.

    Callers should pace only ack-eliciting data; ack-only packets and PTO
    probes need not wait (they still consume tokens if reported, never below 0).
    """

    __slots__ = (
        "_burst_bytes",
        "_capacity",
        "_disabled",
        "_granularity",
        "_last",
        "_rate",
        "_tokens",
        "max_datagram_size",
    )

    max_datagram_size: int
    _burst_bytes: int
    _granularity: float
    _rate: float | None
    _capacity: float
    _disabled: bool
    _tokens: float
    _last: float | None

    def __init__(
        self,
        *,
        max_datagram_size: int = 1200,
        burst_packets: int = 10,
        timer_granularity: float = 0.001,
    ) -> None:
        if max_datagram_size <= 0:
            raise ValueError(f"max_datagram_size must be positive, got {max_datagram_size}")
        if burst_packets < 1:
            raise ValueError(f"burst_packets must be at least 1, got {burst_packets}")
        if timer_granularity < 0:
            raise ValueError(f"timer_granularity must not be negative, got {timer_granularity}")
        self.max_datagram_size = max_datagram_size
        self._burst_bytes = burst_packets * max_datagram_size
        self._granularity = timer_granularity
        self._rate = None
        self._capacity = float(self._burst_bytes)
        self._disabled = True
        self._tokens = self._capacity
        self._last = None

    @property
    def rate(self) -> float | None:
        """Pacing rate in bytes per second; None before the first `update_rate`."""
        return self._rate

    @property
    def capacity(self) -> float:
        """Bucket size in bytes: the largest burst the pacer lets out at once."""
        return self._capacity

    @property
    def enabled(self) -> bool:
        """False while pacing could not delay anything useful (see the class doc)."""
        return not self._disabled

    def update_rate(
        self, congestion_window: int, smoothed_rtt: float, pacing_rate: float | None = None
    ) -> None:
        """Recompute the rate from the current window and smoothed RTT.

        A controller with its own model of the path (BBR) passes
        `pacing_rate` in bytes per second, which is used as is; the window
        still decides whether pacing is worth switching on.
        """
        if pacing_rate is not None:
            rate = max(pacing_rate, float(_MIN_RATE))
        else:
            rate = PACING_GAIN * congestion_window / max(smoothed_rtt, _MIN_SRTT)
        per_tick = rate * self._granularity
        self._rate = rate
        self._disabled = per_tick >= congestion_window
        capacity = max(float(self._burst_bytes), per_tick)
        self._capacity = capacity
        if self._tokens > capacity:
            self._tokens = capacity

    def next_send_time(self, now: float, size: int) -> float | None:
        """When a packet of `size` bytes may leave: None means now."""
        rate = self._rate
        if rate is None or self._disabled:
            return None
        need = min(float(size), self._capacity)  # an oversize packet waits for a full bucket
        tokens = self._tokens_at(now)
        if tokens + _TOKEN_SLACK >= need:
            return None
        return now + (need - tokens) / rate

    def on_packet_sent(self, now: float, size: int) -> None:
        """Take `size` bytes of tokens for a packet sent at `now`."""
        if self._rate is None:
            return
        tokens = self._tokens_at(now) - size
        self._tokens = tokens if tokens > 0.0 else 0.0
        self._last = now

    def _tokens_at(self, now: float) -> float:
        last = self._last
        rate = self._rate
        if last is None or rate is None:
            return self._capacity
        elapsed = now - last
        if elapsed <= 0.0:
            return self._tokens
        tokens = self._tokens + elapsed * rate
        capacity = self._capacity
        return tokens if tokens < capacity else capacity

    def __repr__(self) -> str:
        return f"Pacer(rate={self._rate}, capacity={self._capacity}, enabled={not self._disabled})"


def make_congestion_controller(name: str, *, max_datagram_size: int = 1200) -> CongestionController:
    """A fresh controller by name: ``"bbr"`` or ``"newreno"`` (`CONGESTION_CONTROLLERS`)."""
    if name == "bbr":
        return BBR(max_datagram_size=max_datagram_size)
    if name == "newreno":
        return NewReno(max_datagram_size=max_datagram_size)
    raise ValueError(f"congestion_control={name!r}: expected one of {CONGESTION_CONTROLLERS}")
