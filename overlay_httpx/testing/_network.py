"""A deterministic in-memory UDP network with a virtual clock, for sans-IO endpoints.

Tests of the tunnel must exercise loss, reordering, congestion, NAT rebinding
and idle periods of many minutes, yet run in milliseconds and fail the same way
every time. `Network` does that: it polls each endpoint for datagrams, carries
them over per-direction links (loss, duplication, reordering, delay, jitter,
bandwidth with a drop-tail queue, MTU), and jumps the `VirtualClock` straight
to the next delivery or timer. All randomness comes from one
``random.Random(seed)`` and ties are broken by a sequence counter, so the same
seed and the same endpoint behaviour give an identical run.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Final, Literal, NamedTuple, Protocol

__all__ = [
    "Endpoint",
    "Fate",
    "LinkConfig",
    "Network",
    "NetworkStatistics",
    "TraceEntry",
    "VirtualClock",
]

_Addr = tuple[str, int]

#: Timer fires of one endpoint at one instant, with nothing delivered to it in
#: between, after which the endpoint is declared to be busy-looping.
_BUSY_LOOP_LIMIT: Final = 1000

Fate = Literal[
    "sent", "delivered", "loss", "queue", "mtu", "rebind", "partition", "unreachable", "duplicate"
]


class Endpoint(Protocol):
    """The sans-IO surface `Network` drives (the shape of aioquic's QuicConnection)."""

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> None: ...

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...


class VirtualClock:
    """Seconds of simulated time; moves only forward, and only when told to."""

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        if not math.isfinite(start):
            raise ValueError(f"clock start must be a finite number, got {start!r}")
        self._now = float(start)

    @property
    def now(self) -> float:
        return self._now

    def advance_to(self, t: float) -> None:
        """Set the time to `t`; going backwards is a bug in the caller (ValueError)."""
        if not t >= self._now:  # also rejects NaN
            raise ValueError(f"cannot move the clock backwards from {self._now!r} to {t!r}")
        self._now = float(t)

    def __repr__(self) -> str:
        return f"VirtualClock(now={self._now!r})"


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """How one direction of a link treats datagrams; durations in seconds.

    Probabilities apply independently per datagram. With `bandwidth` set, each
    link serializes datagrams one after another (a datagram departs once the
    previous one has finished), and `queue_bytes` bounds the bytes waiting or
    being transmitted on it (drop-tail), which is what makes congestion
    control observable.
    """

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.005
    delay: float = 0.0
    jitter: float = 0.0
    bandwidth: float | None = None
    queue_bytes: int | None = None
    mtu: int = 65535
    #: How long after the original a duplicated datagram's second copy arrives.
    duplicate_delay: float = 0.001

    def __post_init__(self) -> None:
        def bad(value: object, kind: type | tuple[type, ...]) -> bool:
            return isinstance(value, bool) or not isinstance(value, kind)

        for name in ("loss", "duplicate", "reorder"):
            p = getattr(self, name)
            if bad(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}={p!r}: expected a probability between 0 and 1")
        for name in ("reorder_delay", "delay", "jitter", "duplicate_delay"):
            t = getattr(self, name)
            if bad(t, (int, float)) or not 0.0 <= t < math.inf:
                raise ValueError(f"{name}={t!r}: expected a finite, non-negative number of seconds")
        bw, qb = self.bandwidth, self.queue_bytes
        if bw is not None and (bad(bw, (int, float)) or not 0.0 < bw < math.inf):
            raise ValueError(f"bandwidth={bw!r}: expected bits per second > 0, or None")
        if qb is not None and (bad(qb, int) or qb < 0 or bw is None):
            raise ValueError(f"queue_bytes={qb!r}: expected an int >= 0, with a bandwidth set")
        if bad(self.mtu, int) or self.mtu < 1:
            raise ValueError(f"mtu={self.mtu!r}: expected a positive int")


@dataclass(frozen=True, slots=True)
class NetworkStatistics:
    """Datagram counts, for the whole network or one direction of one link.

    `sent` counts datagrams the endpoints emitted; `duplicated` counts extra
    copies the network made. Every copy ends up `delivered`, in one `dropped_*`
    count, or still in flight.
    """

    sent: int = 0
    delivered: int = 0
    dropped_loss: int = 0
    dropped_queue: int = 0
    dropped_mtu: int = 0
    dropped_rebind: int = 0
    dropped_partition: int = 0
    dropped_unreachable: int = 0
    duplicated: int = 0
    reordered: int = 0
    bytes_delivered: int = 0

    @property
    def dropped(self) -> int:
        """All drops, whatever the cause."""
        return sum(getattr(self, f.name) for f in fields(self) if f.name[:8] == "dropped_")


class TraceEntry(NamedTuple):
    """One thing that happened to a datagram (recorded with ``Network(record=True)``).

    ``time`` is the send time for ``"sent"``, ``"duplicate"`` (a second copy was
    made) and drops on sending; the arrival time for ``"delivered"`` and drops
    on arrival (``"rebind"``, ``"unreachable"``, a ``"partition"`` begun since).
    """

    time: float
    src: tuple[str, int]
    dst: tuple[str, int]
    size: int
    fate: Fate


_COUNT_NAMES: Final = tuple(f.name for f in fields(NetworkStatistics))
_Counts = dict[str, int]  # per link, keyed by NetworkStatistics field; totals summed on demand


class _Link:
    """One direction's config, counters and transmit queue (departure times, sizes)."""

    __slots__ = ("busy_until", "config", "counts", "queue", "queued_bytes")

    def __init__(self, config: LinkConfig, counts: _Counts) -> None:
        self.config = config
        self.counts = counts
        self.busy_until = -math.inf
        self.queue: deque[tuple[float, int]] = deque()
        self.queued_bytes = 0


class _Node:
    __slots__ = ("addr", "endpoint", "fired_at", "fires")

    def __init__(self, endpoint: Endpoint, addr: _Addr) -> None:
        self.endpoint = endpoint
        self.addr = addr
        self.fired_at = -math.inf
        self.fires = 0


# (arrival time, sequence, src, dst, payload, dst generation, link counters)
_Event = tuple[float, int, _Addr, _Addr, bytes, int, _Counts]


class Network:
    """Endpoints at UDP-style addresses, joined by configurable one-way links.

    >>> net = Network(seed=1, link=LinkConfig(delay=0.05))
    >>> net.now
    0.0
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        clock: VirtualClock | None = None,
        link: LinkConfig | None = None,
        record: bool = False,
    ) -> None:
        self._rng = random.Random(seed)
        self._clock = clock if clock is not None else VirtualClock()
        self._default = link if link is not None else LinkConfig()
        self._record = record
        self._trace: list[TraceEntry] = []
        self._nodes: dict[_Addr, _Node] = {}
        self._links: dict[tuple[_Addr, _Addr], _Link] = {}
        self._counts: dict[tuple[_Addr, _Addr], _Counts] = {}
        self._partitions: set[frozenset[_Addr]] = set()
        self._generation: dict[_Addr, int] = {}  # bumped when an address is vacated by rebind
        self._events: list[_Event] = []
        self._seq = 0

    # -- topology -------------------------------------------------------------

    @property
    def now(self) -> float:
        return self._clock.now

    @property
    def clock(self) -> VirtualClock:
        return self._clock

    @property
    def in_flight(self) -> int:
        """Datagram copies currently on their way."""
        return len(self._events)

    def add(self, endpoint: Endpoint, addr: tuple[str, int]) -> None:
        """Attach `endpoint` at `addr`; it sends from there and receives there."""
        if addr in self._nodes:
            raise ValueError(f"address {addr!r} is already taken by {self._nodes[addr].endpoint!r}")
        for node in self._nodes.values():
            if node.endpoint is endpoint:
                raise ValueError(f"endpoint {endpoint!r} is already attached at {node.addr!r}")
        self._nodes[addr] = _Node(endpoint, addr)

    def set_link(self, src: tuple[str, int], dst: tuple[str, int], config: LinkConfig) -> None:
        """Configure the direction src -> dst only (its queue state is kept)."""
        self._link(src, dst).config = config

    def set_all_links(self, config: LinkConfig) -> None:
        """Configure every link, existing ones and those used for the first time later."""
        self._default = config
        for link in self._links.values():
            link.config = config

    def partition(self, a: tuple[str, int], b: tuple[str, int], *, blocked: bool = True) -> None:
        """Drop everything between `a` and `b`, both ways and in flight, until unblocked."""
        key = frozenset((a, b))
        if blocked:
            self._partitions.add(key)
        else:
            self._partitions.discard(key)

    def rebind(self, old: tuple[str, int], new: tuple[str, int]) -> None:
        """NAT rebinding: the endpoint at `old` now sends from and is reached at `new`.

        Datagrams in flight to `old` are dropped (``dropped_rebind``). Its links,
        with their configs and queues, and its partitions move to `new`;
        statistics stay with the address pairs they were counted on.
        """
        if old not in self._nodes:
            raise ValueError(f"no endpoint at {old!r} to rebind")
        if new in self._nodes:
            raise ValueError(f"address {new!r} is already taken by {self._nodes[new].endpoint!r}")
        node = self._nodes.pop(old)
        node.addr = new
        self._nodes[new] = node
        self._generation[old] = self._generation.get(old, 0) + 1

        def move(a: _Addr) -> _Addr:
            return new if a == old else a

        for key in [k for k in self._links if old in k]:
            link = self._links.pop(key)
            moved = (move(key[0]), move(key[1]))
            link.counts = self._counts_for(moved)
            self._links[moved] = link
        for pair in [p for p in self._partitions if old in p]:
            self._partitions.discard(pair)
            self._partitions.add(frozenset(move(a) for a in pair))

    # -- running --------------------------------------------------------------

    def run(
        self,
        *,
        until: Callable[[], bool] | None = None,
        timeout: float = 60.0,
        max_events: int = 10_000_000,
    ) -> bool:
        """Run until `until()` holds (True), or `timeout` virtual seconds pass (False).

        Endpoints are polled at the start and after every delivery or timer;
        `until` is checked after each poll. With nothing left to do (nothing in
        flight, no timer) it stops early and returns ``until()``, or True
        without a condition. On timeout the clock is left at start + `timeout`.
        At equal times deliveries go first (in send order), then timers (in
        `add` order). `max_events` bounds deliveries plus timer fires
        (RuntimeError beyond it).
        """
        if not timeout >= 0:
            raise ValueError(f"timeout={timeout!r}: expected a non-negative number")
        deadline = self._clock.now + timeout
        outcome = self._loop(deadline, until, max_events)
        if outcome == "until":
            return True
        if outcome == "idle":
            return until() if until is not None else True
        self._clock.advance_to(deadline)
        return False

    def run_for(self, duration: float, *, max_events: int = 10_000_000) -> None:
        """Process everything due in the next `duration` seconds, ending exactly then."""
        if not duration >= 0:
            raise ValueError(f"duration={duration!r}: expected a non-negative number")
        deadline = self._clock.now + duration
        self._loop(deadline, None, max_events)
        self._clock.advance_to(deadline)

    def _loop(
        self, deadline: float, until: Callable[[], bool] | None, max_events: int
    ) -> Literal["until", "idle", "deadline"]:
        clock, events, nodes = self._clock, self._events, self._nodes
        self._poll_all()
        if until is not None and until():
            return "until"
        processed = 0
        while True:
            t_timer, timer_node = math.inf, None
            for node in nodes.values():
                t = node.endpoint.get_timer()
                if t is not None and t < t_timer:
                    t_timer, timer_node = t, node
            t_next = min(events[0][0], t_timer) if events else t_timer
            if t_next == math.inf:
                return "idle"
            if t_next > deadline:
                return "deadline"
            processed += 1
            if processed > max_events:
                raise RuntimeError(f"run stopped after max_events={max_events} events")
            now = clock.now
            if t_next > now:
                clock.advance_to(t_next)
                now = t_next
            if events and events[0][0] <= t_timer:
                self._deliver(heapq.heappop(events), now)
            else:
                assert timer_node is not None
                self._fire(timer_node, now)
            self._poll_all()
            if until is not None and until():
                return "until"

    def _fire(self, node: _Node, now: float) -> None:
        if node.fired_at == now:
            node.fires += 1
            if node.fires > _BUSY_LOOP_LIMIT:
                raise RuntimeError(
                    f"endpoint {node.endpoint!r} at {node.addr!r} fired its timer "
                    f"{node.fires} times at t={now!r} without time advancing: its get_timer() "
                    "keeps returning a time that has already passed (busy loop)"
                )
        else:
            node.fired_at, node.fires = now, 1
        node.endpoint.handle_timer(now)

    def _poll_all(self) -> None:
        now = self._clock.now
        for node in list(self._nodes.values()):
            for data, dst in node.endpoint.datagrams_to_send(now):
                self._send(node.addr, dst, data, now)

    def _send(self, src: _Addr, dst: _Addr, data: bytes, now: float) -> None:
        link = self._links.get((src, dst)) or self._link(src, dst)
        cfg, counts, size = link.config, link.counts, len(data)
        counts["sent"] += 1
        self._log(now, src, dst, size, "sent")
        if self._partitions and frozenset((src, dst)) in self._partitions:
            counts["dropped_partition"] += 1
            return self._log(now, src, dst, size, "partition")
        if size > cfg.mtu:
            counts["dropped_mtu"] += 1
            return self._log(now, src, dst, size, "mtu")
        depart = now
        if cfg.bandwidth is not None:
            queue = link.queue
            while queue and queue[0][0] <= now:
                link.queued_bytes -= queue.popleft()[1]
            if cfg.queue_bytes is not None and link.queued_bytes + size > cfg.queue_bytes:
                counts["dropped_queue"] += 1
                return self._log(now, src, dst, size, "queue")
            depart = max(now, link.busy_until) + size * 8 / cfg.bandwidth
            link.busy_until = depart
            queue.append((depart, size))
            link.queued_bytes += size
        rng = self._rng
        if cfg.loss and rng.random() < cfg.loss:
            counts["dropped_loss"] += 1
            return self._log(now, src, dst, size, "loss")
        arrival = depart + cfg.delay
        if cfg.jitter:
            arrival += rng.uniform(0.0, cfg.jitter)
        if cfg.reorder and rng.random() < cfg.reorder:
            arrival += cfg.reorder_delay
            counts["reordered"] += 1
        generation = self._generation.get(dst, 0)
        self._seq += 1
        heapq.heappush(self._events, (arrival, self._seq, src, dst, data, generation, counts))
        if cfg.duplicate and rng.random() < cfg.duplicate:
            counts["duplicated"] += 1
            self._log(now, src, dst, size, "duplicate")
            self._seq += 1
            event = (arrival + cfg.duplicate_delay, self._seq, src, dst, data, generation, counts)
            heapq.heappush(self._events, event)

    def _deliver(self, event: _Event, now: float) -> None:
        _, _, src, dst, data, generation, counts = event
        size = len(data)
        if self._generation.get(dst, 0) != generation:
            counts["dropped_rebind"] += 1
            return self._log(now, src, dst, size, "rebind")
        if self._partitions and frozenset((src, dst)) in self._partitions:
            counts["dropped_partition"] += 1
            return self._log(now, src, dst, size, "partition")
        node = self._nodes.get(dst)
        if node is None:
            counts["dropped_unreachable"] += 1
            return self._log(now, src, dst, size, "unreachable")
        counts["delivered"] += 1
        counts["bytes_delivered"] += size
        self._log(now, src, dst, size, "delivered")
        node.fires = 0
        node.endpoint.receive_datagram(data, src, now)

    def _link(self, src: _Addr, dst: _Addr) -> _Link:
        link = self._links.get((src, dst))
        if link is None:
            link = self._links[src, dst] = _Link(self._default, self._counts_for((src, dst)))
        return link

    def _counts_for(self, key: tuple[_Addr, _Addr]) -> _Counts:
        return self._counts.setdefault(key, dict.fromkeys(_COUNT_NAMES, 0))

    def _log(self, now: float, src: _Addr, dst: _Addr, size: int, fate: Fate) -> None:
        if self._record:
            self._trace.append(TraceEntry(now, src, dst, size, fate))

    # -- observation ----------------------------------------------------------

    def statistics(self) -> NetworkStatistics:
        """Totals over every link so far."""
        return NetworkStatistics(
            **{n: sum(c[n] for c in self._counts.values()) for n in _COUNT_NAMES}
        )

    def statistics_for(self, src: tuple[str, int], dst: tuple[str, int]) -> NetworkStatistics:
        """Counts for datagrams sent from `src` to `dst` (those addresses, not endpoints)."""
        counts = self._counts.get((src, dst))
        return NetworkStatistics(**counts) if counts is not None else NetworkStatistics()

    def trace(self) -> list[TraceEntry]:
        """Everything recorded so far, in order; needs ``Network(record=True)``."""
        if not self._record:
            raise RuntimeError("tracing is off: create the network with Network(record=True)")
        return list(self._trace)

    def datagrams_between(
        self,
        t0: float,
        t1: float = math.inf,
        *,
        src: tuple[str, int] | None = None,
        dst: tuple[str, int] | None = None,
    ) -> int:
        """How many datagrams were sent at ``t0 <= time < t1`` (optionally from/to given addrs).

        Handy for "nothing is sent after close" or "keepalives stop when idle".
        """
        return sum(
            1
            for e in self.trace()
            if e.fate == "sent"
            and t0 <= e.time < t1
            and (src is None or e.src == src)
            and (dst is None or e.dst == dst)
        )
