"""BBR congestion control: BBRv1's state machine with BBRv2-style loss tolerance, sans-IO.

NewReno reads every loss as congestion and halves its window, which caps
goodput at the Mathis bound (about 2 Mbit/s at 1 % random loss on a 50 ms
path). BBR instead builds a model of the path from two measurements and
sends at what the model says the path carries:

* ``btl_bw``: the maximum delivery rate over the last `BW_WINDOW_ROUNDS`
  round trips (`DeliveryRateEstimator` + `WindowedMaxFilter`);
* ``min_rtt``: the minimum RTT over the last `MIN_RTT_WINDOW` seconds.

Their product is the bandwidth-delay product (BDP). The pacing rate is
``pacing_gain * btl_bw`` and the window ``cwnd_gain * BDP`` plus a few
datagrams of slack, with the gains set by a state machine:

* **Startup**: pacing gain 2.89 (2/ln 2), which doubles the delivery rate
  every round trip, window gain 2. It ends when the bandwidth estimate has
  not grown by 25 % in three non-app-limited rounds (the pipe is full), or
  sooner if a round whose estimate did not grow also lost too much.
* **Drain**: pacing gain 1/2.89 until what is in flight fits the BDP again,
  emptying the queue Startup built.
* **ProbeBW**: cycles pacing gains 1.25, 0.75, then 1.0 for six phases,
  each about one ``min_rtt`` long: probe for more bandwidth, drain what the
  probe queued, cruise. Window gain 2.
* **ProbeRTT**: when ``min_rtt`` has not been refreshed for 10 s the window
  drops to four datagrams for at least 200 ms and a round trip, so queues
  drain and the true propagation delay can be measured again.

Loss tolerance (after BBRv2): random loss does not change the model, so
1 % loss costs about 1 % of goodput rather than 97 %. Only a round trip in
which more than `LOSS_THRESH` (2 %) of the bytes were lost, at least
`LOSS_MIN_PACKETS` of them and clearly more than 1 % random loss would
explain (`LOSS_NOISE_SIGMAS`), counts as congestion: it caps inflight at
`BETA` (0.7) times what was in flight (``inflight_hi``), which bounds the
window below the model's until rounds are clean again; each clean round in
which the cap was reached raises it by `INFLIGHT_HI_GROWTH`. Persistent
congestion (RFC 9002 §7.6) collapses the window to the minimum and lowers
the cap the same way. The bandwidth filter then forgets the old rate
within ten rounds, since samples taken under the cap are not app-limited.

Application-limited samples never lower ``btl_bw``. The tunnel does not
report running out of data, so the controller infers it when sending: a
packet that leaves after an idle gap (nothing in flight, or a gap well
beyond what pacing explains while the window had room) opens an
app-limited bubble. Callers that know better may call `set_app_limited`.

Deliberate simplifications: no packet conservation during recovery (it
would shrink the window on every random loss), no BBRv2 lower bounds
(``bw_lo``/``inflight_lo``), and ProbeBW starts at a fixed cruise phase
rather than a random one, so runs are reproducible.

Nothing here reads a clock: every method that needs time takes ``now``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from ._rate import DeliveryRateEstimator, RateSample, RoundLoss, WindowedMaxFilter

if TYPE_CHECKING:
    from ._recovery import SentPacket

__all__ = [
    "BBR",
    "BETA",
    "BW_WINDOW_ROUNDS",
    "DRAIN_PACING_GAIN",
    "LOSS_MIN_PACKETS",
    "LOSS_THRESH",
    "MIN_RTT_WINDOW",
    "PROBE_BW_GAINS",
    "PROBE_RTT_DURATION",
    "STARTUP_PACING_GAIN",
    "BBRState",
]

STARTUP_PACING_GAIN: Final = 2.89
"""2/ln 2: the smallest gain that doubles the delivery rate every round trip."""

STARTUP_CWND_GAIN: Final = 2.0
"""Window gain in Startup and Drain: one BDP in the pipe plus one queued, no more."""

DRAIN_PACING_GAIN: Final = 1 / STARTUP_PACING_GAIN
"""Drain pacing gain: empties Startup's queue in about one round trip."""

PROBE_BW_CWND_GAIN: Final = 2.0
"""Window gain in ProbeBW: room for delayed and stretched ACKs without idling."""

# (Final[tuple[float, ...]], not an inferred fixed-length tuple: mypyc issue 1183)
PROBE_BW_GAINS: Final[tuple[float, ...]] = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
"""ProbeBW pacing gains, one phase per min_rtt: probe, drain the probe, cruise six."""

PROBE_BW_START_PHASE: Final = 2
"""Index ProbeBW starts at: cruise, since Drain has just emptied the queue."""

BW_WINDOW_ROUNDS: Final = 10
"""Round trips the bandwidth max filter remembers (two ProbeBW cycles and a bit)."""

MIN_RTT_WINDOW: Final = 10.0
"""Seconds a min_rtt sample stays valid before ProbeRTT re-measures it."""

PROBE_RTT_DURATION: Final = 0.2
"""Seconds ProbeRTT holds the window at `PROBE_RTT_PACKETS` (and at least one round)."""

PROBE_RTT_PACKETS: Final = 4
"""ProbeRTT window, and the minimum window, in datagrams."""

FULL_BW_GROWTH: Final = 1.25
"""Startup continues while the bandwidth estimate grows by this factor per round."""

FULL_BW_ROUNDS: Final = 3
"""Rounds without that growth after which the pipe counts as full."""

LOSS_THRESH: Final = 0.02
"""Fraction of a round's bytes lost above which the round signals congestion (BBRv2)."""

LOSS_MIN_PACKETS: Final = 3
"""Fewest packets lost in a round for it to signal congestion: one or two losses in a
small round are what random loss looks like."""

LOSS_NOISE_SIGMAS: Final = 3.0
"""A congested round must also lose this many standard deviations more packets than
random loss at half `LOSS_THRESH` would: 2 % of a 100-packet round is noise at 1 %."""

STARTUP_LOSS_MIN_PACKETS: Final = 8
"""Fewest packets lost in a round for it to end Startup (BBRv2's ``full_loss_cnt``):
leaving Startup early is costly, so random loss must not do it."""

BETA: Final = 0.7
"""Multiplicative cap on inflight after a congested round (BBRv2's beta)."""

INFLIGHT_HI_GROWTH: Final = 1.125
"""Growth per clean round of the inflight cap, while the cap is what limits the sender."""

PACING_MARGIN: Final = 0.01
"""Pace 1 % below the estimate so a standing queue cannot build from rounding."""

QUANTA_PACKETS: Final = 3
"""Datagrams added to every window target for pacing bursts and ACK aggregation."""

APP_LIMITED_GAP: Final = 0.002
"""Seconds of unexplained silence before a send that mark it application-limited; above
the 1 ms timer granularity a real event loop may add to a paced send."""

_INITIAL_WINDOW_CAP: Final = 14720


class BBRState(enum.Enum):
    """The four BBR states."""

    STARTUP = "startup"
    DRAIN = "drain"
    PROBE_BW = "probe_bw"
    PROBE_RTT = "probe_rtt"


class BBR:
    """A BBR congestion controller behind the `CongestionController` protocol.

    Construct with the datagram size; drive it through `LossRecovery` (or
    directly: `on_packet_sent` with the `SentPacket` so it can be stamped,
    then `on_packets_acked` / `on_packets_lost`). `congestion_window`,
    `bytes_in_flight` and `pacing_rate` are the outputs; the rest is state
    exposed for tests and statistics.
    """

    __slots__ = (
        "_app_limited_flag",
        "_bw_filter",
        "_cycle_index",
        "_cycle_stamp",
        "_filled_pipe",
        "_full_bw",
        "_full_bw_count",
        "_idle_restart",
        "_inflight_hi",
        "_last_sent",
        "_lost_in_ack",
        "_min_rtt",
        "_min_rtt_stamp",
        "_next_round_delivered",
        "_pacing_rate",
        "_prior_cwnd",
        "_prior_round_bw",
        "_probe_rtt_done_stamp",
        "_probe_rtt_round_done",
        "_rate",
        "_round_count",
        "_round_loss",
        "_round_max_inflight",
        "_state",
        "_window_full",
        "bytes_in_flight",
        "congestion_window",
        "cwnd_gain",
        "initial_window",
        "max_datagram_size",
        "minimum_window",
        "pacing_gain",
    )

    congestion_window: int
    bytes_in_flight: int
    max_datagram_size: int
    initial_window: int
    minimum_window: int
    pacing_gain: float
    cwnd_gain: float

    def __init__(self, *, max_datagram_size: int = 1200, initial_window: int | None = None) -> None:
        if max_datagram_size <= 0:
            raise ValueError(f"max_datagram_size must be positive, got {max_datagram_size}")
        minimum_window = PROBE_RTT_PACKETS * max_datagram_size
        if initial_window is None:
            initial_window = min(
                10 * max_datagram_size, max(_INITIAL_WINDOW_CAP, 2 * max_datagram_size)
            )
        initial_window = max(initial_window, minimum_window)
        self.max_datagram_size = max_datagram_size
        self.initial_window = initial_window
        self.minimum_window = minimum_window
        self.congestion_window = initial_window
        self.bytes_in_flight = 0
        self._rate = DeliveryRateEstimator()
        self._bw_filter = WindowedMaxFilter(BW_WINDOW_ROUNDS)
        self._min_rtt: float | None = None
        self._min_rtt_stamp = 0.0
        self._round_count = 0
        self._next_round_delivered = 0
        self._filled_pipe = False
        self._full_bw = 0.0
        self._full_bw_count = 0
        self._prior_round_bw = 0.0
        self._cycle_index = PROBE_BW_START_PHASE
        self._cycle_stamp = 0.0
        self._probe_rtt_done_stamp: float | None = None
        self._probe_rtt_round_done = False
        self._prior_cwnd = initial_window
        self._idle_restart = False
        self._pacing_rate: float | None = None
        self._inflight_hi: int | None = None
        self._round_loss = RoundLoss()
        self._round_max_inflight = 0
        self._lost_in_ack = False
        self._last_sent: float | None = None
        self._window_full = False
        self._app_limited_flag = False
        self._state = BBRState.STARTUP
        self.pacing_gain = STARTUP_PACING_GAIN
        self.cwnd_gain = STARTUP_CWND_GAIN

    # -- views ----------------------------------------------------------------

    @property
    def state(self) -> BBRState:
        return self._state

    @property
    def btl_bw(self) -> float:
        """Bottleneck bandwidth estimate in bytes per second (0.0 before any sample)."""
        return self._bw_filter.get()

    @property
    def min_rtt(self) -> float | None:
        """Propagation delay estimate in seconds; None before any RTT sample."""
        return self._min_rtt

    @property
    def pacing_rate(self) -> float | None:
        """Bytes per second to pace at; None until the first RTT sample."""
        return self._pacing_rate

    @property
    def round_count(self) -> int:
        """Round trips counted so far (one per flight of delivered data)."""
        return self._round_count

    @property
    def filled_pipe(self) -> bool:
        """Whether Startup has found the bandwidth ceiling."""
        return self._filled_pipe

    @property
    def inflight_hi(self) -> int | None:
        """The loss-derived cap on the window in bytes; None while no round was congested."""
        return self._inflight_hi

    @property
    def app_limited(self) -> bool:
        """Whether packets sent now would be marked application-limited."""
        return self._rate.app_limited

    @property
    def delivered(self) -> int:
        """Bytes acknowledged over the connection's life."""
        return self._rate.delivered

    def bdp(self, gain: float = 1.0) -> int:
        """``gain`` times the estimated BDP plus `QUANTA_PACKETS` datagrams, in bytes.

        Before the model has both a bandwidth and an RTT this is the initial
        window, so early decisions fall back to the RFC 9002 default.
        """
        bw = self._bw_filter.get()
        min_rtt = self._min_rtt
        if bw <= 0.0 or min_rtt is None:
            return self.initial_window
        return int(gain * bw * min_rtt) + QUANTA_PACKETS * self.max_datagram_size

    def can_send(self, size: int) -> bool:
        return self.bytes_in_flight + size <= self.congestion_window

    # -- events ---------------------------------------------------------------

    def set_app_limited(self, app_limited: bool) -> None:
        """The caller ran out of data with room in the window: open a bubble now."""
        self._app_limited_flag = app_limited
        if app_limited:
            self._rate.mark_app_limited(self.bytes_in_flight)

    def on_packet_sent(self, size: int, now: float, packet: SentPacket | None = None) -> None:
        flight = self.bytes_in_flight
        last = self._last_sent
        if flight == 0:
            if self._rate.delivered:
                # Restart after idle: the silence was the application's.
                self._idle_restart = True
                self._rate.mark_app_limited(0)
                if self._state is BBRState.PROBE_RTT:
                    self._check_probe_rtt_done(now)
        elif self._app_limited_flag or (
            last is not None and not self._window_full and now - last > self._idle_gap(size)
        ):
            self._rate.mark_app_limited(flight)
        self._rate.on_packet_sent(packet, flight, now)
        flight += size
        self.bytes_in_flight = flight
        if flight > self._round_max_inflight:
            self._round_max_inflight = flight
        self._last_sent = now
        self._window_full = flight + self.max_datagram_size > self.congestion_window

    def on_packets_acked(self, packets: Sequence[SentPacket], now: float) -> None:
        acked = 0
        count = 0
        newest: SentPacket | None = None
        for p in packets:
            if p.in_flight:
                acked += p.size
                count += 1
                newest = p
        if newest is None:
            return
        prior_inflight = self.bytes_in_flight
        self.bytes_in_flight = max(0, prior_inflight - acked)
        self._round_loss.acked_bytes += acked
        self._round_loss.acked_packets += count
        rtt = max(0.0, now - newest.time_sent)
        min_rtt = self._min_rtt
        check_rtt = rtt if min_rtt is None or rtt < min_rtt else min_rtt
        sample = self._rate.on_packets_acked(packets, now, check_rtt)
        self._update_model(sample, rtt, prior_inflight, now)
        self._lost_in_ack = False
        self._update_cwnd(acked)
        self._update_pacing_rate()

    def on_packets_lost(self, packets: Sequence[SentPacket], now: float) -> None:
        removed = 0
        count = 0
        for p in packets:
            if p.in_flight:
                removed += p.size
                count += 1
        if not count:
            return
        self.bytes_in_flight = max(0, self.bytes_in_flight - removed)
        self._round_loss.lost_bytes += removed
        self._round_loss.lost_packets += count
        self._lost_in_ack = True

    def on_persistent_congestion(self, now: float) -> None:
        """RFC 9002 §7.6: collapse the window and cap inflight below what was in use."""
        before = self.congestion_window
        hi = self._inflight_hi
        base = before if hi is None or hi > before else hi
        self._set_inflight_hi(int(BETA * base))
        self._prior_cwnd = self.minimum_window
        self.congestion_window = self.minimum_window
        self._window_full = True

    def discard(self, packets: Sequence[SentPacket]) -> None:
        removed = sum(p.size for p in packets if p.in_flight)
        self.bytes_in_flight = max(0, self.bytes_in_flight - removed)

    # -- model ----------------------------------------------------------------

    def _update_model(
        self, sample: RateSample | None, rtt: float, prior_inflight: int, now: float
    ) -> None:
        round_start = False
        lossy = False
        lost_packets = 0
        if sample is not None and sample.prior_delivered >= self._next_round_delivered:
            self._next_round_delivered = self._rate.delivered
            self._round_count += 1
            round_start = True
            lossy, lost_packets = self._round_loss.close(LOSS_THRESH, LOSS_NOISE_SIGMAS)
        if sample is not None:
            rate = sample.delivery_rate
            if rate is not None and (not sample.is_app_limited or rate >= self.btl_bw):
                self._bw_filter.update(rate, self._round_count)
        if self._state is BBRState.PROBE_BW:
            self._update_cycle(now, prior_inflight)
        if round_start:
            if not self._filled_pipe:
                self._check_full_pipe(sample, lossy and lost_packets >= STARTUP_LOSS_MIN_PACKETS)
            elif lossy and lost_packets >= LOSS_MIN_PACKETS:
                self._on_congested_round()
            else:
                self._maybe_raise_inflight_hi()
            self._round_max_inflight = self.bytes_in_flight
        if self._state is BBRState.STARTUP and self._filled_pipe:
            self._enter(BBRState.DRAIN)
        if self._state is BBRState.DRAIN and self.bytes_in_flight <= self.bdp():
            self._enter_probe_bw(now)
        self._update_min_rtt(rtt, now, round_start)
        if sample is not None and sample.delivered > 0:
            self._idle_restart = False

    def _check_full_pipe(self, sample: RateSample | None, lossy: bool) -> None:
        bw = self.btl_bw
        grew = bw >= self._prior_round_bw * FULL_BW_GROWTH
        self._prior_round_bw = bw
        if lossy and not grew:
            # Startup overflowed a queue (app-limited or not, the ceiling is
            # real): remember the inflight that did it. While the estimate
            # still grows, loss is noise and Startup carries on.
            self._filled_pipe = True
            self._set_inflight_hi(max(self.bdp(), int(BETA * self._round_max_inflight)))
            return
        # Only rounds the network limited say anything about the ceiling.
        if sample is None or sample.is_app_limited:
            return
        if bw >= self._full_bw * FULL_BW_GROWTH:
            self._full_bw = bw
            self._full_bw_count = 0
            return
        self._full_bw_count += 1
        if self._full_bw_count >= FULL_BW_ROUNDS:
            self._filled_pipe = True

    def _on_congested_round(self) -> None:
        """A round lost more than `LOSS_THRESH`: cap inflight below what it used."""
        used = self._round_max_inflight
        hi = self._inflight_hi
        base = used if hi is None or hi > used else hi
        self._set_inflight_hi(int(BETA * base))

    def _maybe_raise_inflight_hi(self) -> None:
        """A clean round that pressed against the cap: the cap may be too low."""
        hi = self._inflight_hi
        if hi is None or self._round_max_inflight + self.max_datagram_size < hi:
            return
        if hi >= self.bdp(self.cwnd_gain):
            self._inflight_hi = None  # the model's own window is the tighter bound again
            return
        step = max(self.max_datagram_size, int(hi * (INFLIGHT_HI_GROWTH - 1.0)))
        self._inflight_hi = hi + step

    def _set_inflight_hi(self, value: int) -> None:
        self._inflight_hi = max(value, self.minimum_window)

    def _update_cycle(self, now: float, prior_inflight: int) -> None:
        """Advance the ProbeBW gain cycle (BBRv1 ``bbr_is_next_cycle_phase``)."""
        min_rtt = self._min_rtt or 0.0
        full_length = now - self._cycle_stamp > min_rtt
        gain = self.pacing_gain
        if gain > 1.0:
            # Probe until inflight reaches the probe's target (or the window lets
            # no more out), or a loss says the queue is full.
            ceiling = min(self.bdp(gain), self.congestion_window - self.max_datagram_size)
            advance = full_length and (self._lost_in_ack or prior_inflight >= ceiling)
        elif gain < 1.0:
            advance = full_length or prior_inflight <= self.bdp()
        else:
            advance = full_length
        if advance:
            self._cycle_index = (self._cycle_index + 1) % len(PROBE_BW_GAINS)
            self._cycle_stamp = now
            self.pacing_gain = PROBE_BW_GAINS[self._cycle_index]

    def _update_min_rtt(self, rtt: float, now: float, round_start: bool) -> None:
        min_rtt = self._min_rtt
        expired = min_rtt is not None and now > self._min_rtt_stamp + MIN_RTT_WINDOW
        if min_rtt is None or rtt < min_rtt or expired:
            self._min_rtt = rtt
            self._min_rtt_stamp = now
        if expired and not self._idle_restart and self._state is not BBRState.PROBE_RTT:
            self._prior_cwnd = self._saved_cwnd()
            self._probe_rtt_done_stamp = None
            self._enter(BBRState.PROBE_RTT)
        if self._state is not BBRState.PROBE_RTT:
            return
        # Keep the draining ProbeRTT flight out of the bandwidth filter.
        self._rate.mark_app_limited(self.bytes_in_flight)
        if self._probe_rtt_done_stamp is None:
            if self.bytes_in_flight <= self._probe_rtt_window():
                self._probe_rtt_done_stamp = now + PROBE_RTT_DURATION
                self._probe_rtt_round_done = False
                self._next_round_delivered = self._rate.delivered
        else:
            if round_start:
                self._probe_rtt_round_done = True
            if self._probe_rtt_round_done:
                self._check_probe_rtt_done(now)

    def _check_probe_rtt_done(self, now: float) -> None:
        done = self._probe_rtt_done_stamp
        if done is None or now < done:
            return
        self._min_rtt_stamp = now  # the sample stands for another window
        self.congestion_window = max(self.congestion_window, self._prior_cwnd)
        if self._filled_pipe:
            self._enter_probe_bw(now)
        else:
            self._enter(BBRState.STARTUP)

    def _saved_cwnd(self) -> int:
        # The window to restore after ProbeRTT: never the ProbeRTT one itself.
        if self._state is BBRState.PROBE_RTT:
            return max(self._prior_cwnd, self.congestion_window)
        return self.congestion_window

    def _probe_rtt_window(self) -> int:
        return PROBE_RTT_PACKETS * self.max_datagram_size

    def _enter(self, state: BBRState) -> None:
        self._state = state
        if state is BBRState.STARTUP:
            self.pacing_gain = STARTUP_PACING_GAIN
            self.cwnd_gain = STARTUP_CWND_GAIN
        elif state is BBRState.DRAIN:
            self.pacing_gain = DRAIN_PACING_GAIN
            self.cwnd_gain = STARTUP_CWND_GAIN
        elif state is BBRState.PROBE_RTT:
            self.pacing_gain = 1.0
            self.cwnd_gain = 1.0

    def _enter_probe_bw(self, now: float) -> None:
        self._state = BBRState.PROBE_BW
        self._cycle_index = PROBE_BW_START_PHASE
        self._cycle_stamp = now
        self.pacing_gain = PROBE_BW_GAINS[PROBE_BW_START_PHASE]
        self.cwnd_gain = PROBE_BW_CWND_GAIN

    # -- control --------------------------------------------------------------

    def _update_cwnd(self, acked: int) -> None:
        """BBRv1 ``bbr_set_cwnd``: grow towards the target, capped by ``inflight_hi``."""
        target = self.bdp(self.cwnd_gain)
        cwnd = self.congestion_window
        if self._filled_pipe:
            cwnd = min(cwnd + acked, target)
        elif cwnd < target or self._rate.delivered < self.initial_window:
            cwnd += acked
        hi = self._inflight_hi
        if hi is not None and cwnd > hi:
            cwnd = hi
        if self._state is BBRState.PROBE_RTT:
            cwnd = min(cwnd, self._probe_rtt_window())
        self.congestion_window = max(cwnd, self.minimum_window)

    def _update_pacing_rate(self) -> None:
        current = self._pacing_rate
        if current is None:
            min_rtt = self._min_rtt
            if min_rtt is None:
                return
            # The first ACK's samples cover a fraction of the first flight; start
            # from the rate that sends the whole window in one RTT, with the gain.
            current = STARTUP_PACING_GAIN * self.congestion_window / max(min_rtt, 1e-6)
            self._pacing_rate = current
        bw = self._bw_filter.get()
        if bw <= 0.0:
            return
        rate = self.pacing_gain * bw * (1.0 - PACING_MARGIN)
        # Startup only ever speeds up: one slow sample must not stall the ramp.
        if self._filled_pipe or rate > current:
            self._pacing_rate = rate

    def _idle_gap(self, size: int) -> float:
        """How long a silence pacing can explain before a send of `size` bytes."""
        rate = self._pacing_rate
        paced = 4.0 * size / rate if rate else 0.0
        return paced if paced > APP_LIMITED_GAP else APP_LIMITED_GAP

    def __repr__(self) -> str:
        return (
            f"BBR(state={self._state.value}, cwnd={self.congestion_window}, "
            f"in_flight={self.bytes_in_flight}, btl_bw={self.btl_bw:.0f}, "
            f"min_rtt={self._min_rtt}, pacing_gain={self.pacing_gain}, "
            f"inflight_hi={self._inflight_hi})"
        )
