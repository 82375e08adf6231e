"""The sans-IO endpoint: one identity, one datagram socket's worth of tunnels.

`Endpoint` demultiplexes datagrams by type and session index, answers
initiations (after the MAC, the Noise handshake, the replay timestamp and the
trust policy all agree), and gathers every tunnel's datagrams, timers and
events. `receive_datagram` never raises: whatever is wrong with a datagram,
it is dropped and counted by reason.

Peers reached through a relay have a virtual address (`relay_addr`): what a
tunnel sends there is wrapped in a RELAY datagram to the `relay` endpoint, and
what the relay delivers is unwrapped and handed on as if it came from that
virtual address. A rendezvous server plugs its forwarding in as
`relay_forwarder` instead.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import struct
from collections import Counter, deque
from collections.abc import Callable
from typing import Final

from .._address import Address
from .._exceptions import LocalProtocolError
from .._identity import Identity, PublicIdentity
from ._config import TunnelConfig
from ._cookies import CookieChecker, CookieReply
from ._events import Event
from ._packet import (
    MAC_SIZE,
    RELAY_HOST,
    TYPE_COOKIE,
    TYPE_DATA,
    TYPE_IDENTIFY,
    TYPE_INIT,
    TYPE_PUNCH,
    TYPE_REFUSAL,
    TYPE_RELAY,
    TYPE_RESPONSE,
    DataHeader,
    HandshakeInit,
    HandshakeResponse,
    IdentifyAnswer,
    relay_addr,
    relay_unwrap,
    relay_wrap,
)
from ._sessions import LocalKeys, accept_initiation, random_index
from ._stats import EndpointStatistics
from ._tunnel import Tunnel

__all__ = ["Endpoint", "RelayForwarder", "TrustCallback"]

TrustCallback = Callable[[PublicIdentity, Address], "bool | None"]
"""Called for each authenticated initiation before any state is kept.

True admits; False refuses (the initiator gets an authenticated refusal);
None drops the initiation unanswered, e.g. while the facts to decide are
being fetched (the initiator retries).
"""

RelayForwarder = Callable[[bytes, tuple[str, int], float], "tuple[bytes, tuple[str, int]] | None"]
"""A relay server's hook: given a RELAY datagram and its source, what to send where (or None)."""

_ONE_SECOND_NS: Final = 1_000_000_000
_MAX_REMEMBERED: Final = 16_384  # initiation timestamps of keys without a tunnel
#: internal errors logged with their traceback, per endpoint; later ones are only counted
_LOGGED_INTERNAL_ERRORS: Final = 10

logger = logging.getLogger("overlay_httpx")


class Endpoint:
    """Every tunnel of one node, driven by datagrams and explicit time."""

    def __init__(
        self,
        identity: Identity,
        address: Address,
        *,
        config: TunnelConfig | None = None,
        trust: TrustCallback | None = None,
        timestamp_origin_ns: int = 0,
        boot_id: int | None = None,
        network_key: bytes | None = None,
    ) -> None:
        self.keys = LocalKeys.create(identity, address, network_key)
        self.config = config or TunnelConfig()
        self.boot_id = boot_id if boot_id is not None else struct.unpack("!Q", os.urandom(8))[0]
        self._trust = trust
        self._timestamp_origin = timestamp_origin_ns
        self._last_timestamp = 0
        self._tunnels: dict[bytes, Tunnel] = {}
        # Tunnels that exist only because we answered a new peer's handshake, oldest
        # first (their expiry order), kept out of `_live`: under a handshake flood
        # they number a thousand, and every flush and timer walks `_live` alone.
        self._dormant: dict[bytes, Tunnel] = {}
        self._live: dict[bytes, Tunnel] = {}
        # Only tunnels that something happened to are flushed and asked for their
        # timer: live tunnels touched since their last flush (a datagram, a call of
        # the application's, a timer), and a heap of (deadline, n, peer) whose entry
        # counts while it is its peer's deadline in `_deadlines`. Walking every live
        # tunnel instead cost 2 µs per tunnel and datagram: 2 ms with a thousand peers.
        self._dirty: dict[bytes, Tunnel] = {}
        self._timers: list[tuple[float, int, bytes]] = []
        self._deadlines: dict[bytes, float] = {}
        self._timer_order = itertools.count()
        self._indexes: dict[int, Tunnel] = {}
        self._accepted_timestamps: dict[bytes, int] = {}
        self._listening: set[int] = set()
        self.events: deque[Event] = deque()
        """Events not yet taken, oldest first (`next_event` pops them). Most flushes
        leave it empty, so a driver tests it before calling `next_event`."""
        self._out: list[tuple[bytes, tuple[str, int]]] = []
        self._drops: Counter[str] = Counter()
        self._received = 0
        self._sent = 0
        self.relay: tuple[str, int] | None = None
        """Where RELAY datagrams go (the rendezvous's UDP endpoint), if anywhere."""
        self.relay_forwarder: RelayForwarder | None = None
        self.answer_identify = False
        self.on_identify_answer: Callable[[IdentifyAnswer], None] | None = None
        cfg = self.config
        self.cookies = CookieChecker(
            self.keys.static.public,
            rate_limit=cfg.handshake_rate_limit,
            source_rate=cfg.handshake_source_rate,
            source_burst=cfg.handshake_source_burst,
        )
        """Tell whoever asks our public identity (a rendezvous does; other nodes stay quiet)."""

    @property
    def address(self) -> Address:
        return self.keys.address

    @property
    def public(self) -> PublicIdentity:
        return self.keys.identity.public

    # -- owner interface used by tunnels -------------------------------------------

    def new_index(self, tunnel: Tunnel) -> int:
        while True:
            index = random_index()
            if index not in self._indexes:
                self._indexes[index] = tunnel
                return index

    def release_index(self, index: int) -> None:
        self._indexes.pop(index, None)

    def is_listening(self, port: int) -> bool:
        return port in self._listening

    def timestamp(self, now: float) -> int:
        stamp = max(self._timestamp_origin + int(now * _ONE_SECOND_NS), self._last_timestamp + 1)
        self._last_timestamp = stamp
        return stamp

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def count_drop(self, reason: str) -> None:
        self._drops[reason] += 1

    # -- application interface ---------------------------------------------------------

    def listen(self, port: int) -> None:
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} out of range: expected 0..65535")
        self._listening.add(port)

    def unlisten(self, port: int) -> None:
        self._listening.discard(port)

    def tunnel(self, peer: PublicIdentity | bytes) -> Tunnel | None:
        key = peer.x25519 if isinstance(peer, PublicIdentity) else peer
        return self._tunnels.get(key)

    def tunnels(self) -> list[Tunnel]:
        return list(self._tunnels.values())

    def connect(self, peer: PublicIdentity | bytes, addr: tuple[str, int], now: float) -> Tunnel:
        """The tunnel to `peer`, starting a handshake to `addr` if none exists."""
        key = peer.x25519 if isinstance(peer, PublicIdentity) else peer
        if key == self.keys.static.public:
            raise ValueError("cannot open a tunnel to ourselves")
        tunnel = self._tunnels.get(key)
        if tunnel is None and len(self._tunnels) >= self.config.max_tunnels:
            raise LocalProtocolError(
                f"cannot open a tunnel: this node's limit of {self.config.max_tunnels} "
                "tunnels is reached"
            )
        if tunnel is None or tunnel.is_closed:
            if tunnel is not None:
                self._release_sessions(tunnel)  # replaced while draining
            tunnel = self._tunnels[key] = Tunnel(self, key, addr)
        self._wake(tunnel)
        tunnel.connect(now)
        return tunnel

    def _wake(self, tunnel: Tunnel) -> None:
        """`tunnel` takes part in flushes and timers from now on."""
        self._dormant.pop(tunnel.peer, None)
        self._live[tunnel.peer] = tunnel
        self._dirty[tunnel.peer] = tunnel

    def touch(self, tunnel: Tunnel) -> None:
        """Something happened to `tunnel`: the next flush asks it for datagrams and its timer.

        A call on a tunnel object that has been replaced for its peer (closed,
        then connected again) leaves the replacement's mark alone.
        """
        if self._tunnels.get(tunnel.peer) is tunnel:
            self._dirty[tunnel.peer] = tunnel

    def next_event(self) -> Event | None:
        return self.events.popleft() if self.events else None

    def close(self, now: float, reason: str = "endpoint closed") -> None:
        for tunnel in self._tunnels.values():
            tunnel.close(now, reason=reason)

    # -- datagrams ---------------------------------------------------------------------------

    def receive_datagram(
        self, data: bytes | bytearray | memoryview, addr: tuple[str, int], now: float
    ) -> None:
        """Feed one datagram from `addr`. Never raises; bad input is counted and dropped."""
        self._received += 1
        try:
            self._dispatch(bytes(data), addr, now)
        except Exception:  # a bug must not let a datagram crash the node
            self._drops["internal_error"] += 1
            if self._drops["internal_error"] <= _LOGGED_INTERNAL_ERRORS:
                # a bug of ours, not bad input (that is counted under its own reason):
                # dropped silently, it would look like a stalled transfer
                logger.exception(
                    "tunnel core: internal error on a datagram from %s:%d; dropped it",
                    *addr,
                )

    def _dispatch(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        if not data:
            self._drops["malformed"] += 1
            return
        kind = data[0]
        if kind == TYPE_DATA:
            header = DataHeader.unpack(data)
            if header is None:
                self._drops["malformed"] += 1
                return
            index, counter = header
            tunnel = self._indexes.get(index)
            session = tunnel.session_for(index) if tunnel is not None else None
            if tunnel is None or session is None:
                self._drops["unknown_session"] += 1
                return
            self._dirty[tunnel.peer] = tunnel  # first: marked even if handling fails
            tunnel.handle_data(session, counter, data, addr, now)
            if tunnel.peer in self._dormant and not tunnel.awaiting_confirmation:
                self._wake(tunnel)  # an authenticated packet confirmed the handshake
        elif kind == TYPE_INIT:
            self._on_initiation(data, addr, now)
        elif kind in (TYPE_RESPONSE, TYPE_REFUSAL):
            response = HandshakeResponse.decode(data, self.keys.mac1_key)
            if response is None:
                self._drops["bad_mac"] += 1
                return
            tunnel = self._indexes.get(response.receiver_index)
            if tunnel is None:
                self._drops["unknown_session"] += 1
                return
            self._dirty[tunnel.peer] = tunnel
            tunnel.handle_response(response, addr, now)
        elif kind == TYPE_COOKIE:
            cookie_index = CookieReply.receiver_index(data)
            owner = self._indexes.get(cookie_index) if cookie_index is not None else None
            if cookie_index is None or owner is None:
                self._drops["unknown_session"] += 1
                return
            self._dirty[owner.peer] = owner
            owner.handle_cookie(data, cookie_index, now)  # only initiators, never dormant
        elif kind == TYPE_RELAY:
            self._on_relay(data, addr, now)
        elif kind == TYPE_PUNCH:
            self._drops["punch"] += 1  # it only opened the sender's NAT towards us
        elif kind == TYPE_IDENTIFY:
            self._on_identify(data, addr)
        else:
            self._drops["malformed"] += 1

    def _on_relay(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        if self.relay_forwarder is not None:
            forward = self.relay_forwarder(data, addr, now)
            if forward is not None:
                self._out.append(forward)
            return
        unwrapped = relay_unwrap(data) if addr == self.relay else None
        if unwrapped is None or unwrapped[1][0] == TYPE_RELAY:
            self._drops["bad_relay"] += 1
            return
        source, inner = unwrapped
        self._dispatch(inner, relay_addr(source), now)

    def _on_identify(self, data: bytes, addr: tuple[str, int]) -> None:
        answer = IdentifyAnswer.decode(data)
        if answer is not None:
            if self.on_identify_answer is not None:
                self.on_identify_answer(answer)
            else:
                self._drops["identify"] += 1
            return
        nonce = IdentifyAnswer.nonce_of_request(data)
        if not self.answer_identify or nonce is None:
            self._drops["identify"] += 1
            return
        public = self.keys.identity.public
        answer = IdentifyAnswer(
            nonce, public.x25519, public.ed25519, self.keys.binding, self.address
        )
        self._out.append((answer.encode(), addr))

    def _on_initiation(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        init = HandshakeInit.decode(data, self.keys.mac1_key)
        if init is None:
            self._drops["bad_mac"] += 1
            return
        cookies = self.cookies
        if cookies.under_load(now, self._pending_handshakes(), self.config.max_pending_handshakes):
            if not cookies.mac2_valid(data, addr, now):
                mac1 = data[-2 * MAC_SIZE : -MAC_SIZE]
                self._out.append((cookies.reply(init.sender_index, mac1, addr, now), addr))
                self._drops["cookie_required"] += 1
                return
            if not cookies.allow_source(addr, now):
                self._drops["handshake_rate_limited"] += 1
                return
        cookies.note_handshake(now)
        accepted = accept_initiation(self.keys, init, self.count_drop)
        if accepted is None:
            return
        peer = accepted.remote_static
        if accepted.hello.timestamp <= self._accepted_timestamps.get(peer, -1):
            self._drops["stale_timestamp"] += 1  # a replayed (or reordered old) initiation
            return
        if self._trust is not None:
            verdict = self._trust(accepted.identity, accepted.hello.address)
            if verdict is None:
                self._drops["trust_pending"] += 1
                return
            if not verdict:
                self._drops["untrusted"] += 1
                self._accepted_timestamps[peer] = accepted.hello.timestamp  # no replayed refusals
                if len(self._accepted_timestamps) > _MAX_REMEMBERED:
                    self._forget_strangers()
                refusal = accepted.refuse(self.keys, "its trust policy does not admit us")
                self._out.append((refusal, addr))
                return
        if peer not in self._tunnels and len(self._tunnels) >= self.config.max_tunnels:
            self._drops["tunnel_limit"] += 1
            reason = f"its limit of {self.config.max_tunnels} tunnels is reached"
            self._out.append((accepted.refuse(self.keys, reason), addr))
            return
        tunnel = self._tunnels.get(peer)
        if tunnel is not None and not tunnel.is_closed and tunnel.should_yield_to(now):
            self._drops["simultaneous_initiation"] += 1
            return
        self._accepted_timestamps[peer] = accepted.hello.timestamp
        if tunnel is None or tunnel.is_closed:
            if tunnel is not None:
                self._release_sessions(tunnel)  # replaced while draining
            tunnel = self._tunnels[peer] = Tunnel(self, peer, addr)
            self._live.pop(peer, None)
            self._deadlines.pop(peer, None)
            self._dormant[peer] = tunnel
        elif peer in self._dormant:
            del self._dormant[peer]  # a retried initiation: it expires later now
            self._dormant[peer] = tunnel
        self._dirty[peer] = tunnel  # flushed only once live (see `datagrams_to_send`)
        self._out.append((tunnel.handle_initiation(accepted, addr, now), addr))

    def _forget_strangers(self) -> None:
        """Bound the replay memory: keep the timestamps of keys we have tunnels with."""
        self._accepted_timestamps = {
            k: v for k, v in self._accepted_timestamps.items() if k in self._tunnels
        }

    def _pending_handshakes(self) -> int:
        """Tunnels that only exist because we answered a new peer's handshake."""
        return len(self._dormant)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        out = self._out
        self._out = []
        if self._dirty:
            dirty, self._dirty = self._dirty, {}
            live = self._live
            for peer, tunnel in dirty.items():
                if live.get(peer) is tunnel:
                    out.extend(tunnel.datagrams_to_send(now))
                    self._schedule(tunnel)
        if self.relay is not None:  # only then can a virtual relay address exist
            out = self._wrap_relayed(out)
        self._sent += len(out)
        return out

    def _wrap_relayed(
        self, out: list[tuple[bytes, tuple[str, int]]]
    ) -> list[tuple[bytes, tuple[str, int]]]:
        wrapped: list[tuple[bytes, tuple[str, int]]] = []
        for data, addr in out:
            if addr[0] != RELAY_HOST:
                wrapped.append((data, addr))
            elif self.relay is not None:
                wrapped.append((relay_wrap(Address.from_int(addr[1]), data), self.relay))
            else:
                self._drops["no_relay"] += 1
        return wrapped

    def _schedule(self, tunnel: Tunnel) -> None:
        """Put `tunnel`'s deadline on the heap (a moved deadline leaves a stale entry)."""
        peer = tunnel.peer
        deadline = tunnel.get_timer()
        if deadline is None:
            self._deadlines.pop(peer, None)
        elif self._deadlines.get(peer) != deadline:
            self._deadlines[peer] = deadline
            timers = self._timers
            if len(timers) > 2 * len(self._deadlines) + 64:  # mostly stale: rebuild
                order = self._timer_order
                timers[:] = [(d, next(order), p) for p, d in self._deadlines.items()]
                heapq.heapify(timers)
            else:
                heapq.heappush(timers, (deadline, next(self._timer_order), peer))

    def _schedule_touched(self) -> None:
        """Bring the deadlines of tunnels touched since the last flush up to date."""
        live = self._live
        for peer, tunnel in self._dirty.items():
            if live.get(peer) is tunnel:
                self._schedule(tunnel)

    def _earliest(self) -> tuple[float, bytes] | None:
        """The first current entry of the timer heap (stale ones are dropped on the way)."""
        timers, deadlines, live = self._timers, self._deadlines, self._live
        while timers:
            deadline, _, peer = timers[0]
            if deadlines.get(peer) == deadline:
                if peer in live:
                    return deadline, peer
                del deadlines[peer]  # not expected: only live tunnels are scheduled
            heapq.heappop(timers)
        return None

    def get_timer(self) -> float | None:
        if self._dirty:
            self._schedule_touched()
        earliest = self._earliest()
        best = earliest[0] if earliest is not None else None
        if self._dormant:
            timer = next(iter(self._dormant.values())).get_timer()  # the first to expire
            if timer is not None and (best is None or timer < best):
                best = timer
        return best

    def handle_timer(self, now: float) -> None:
        if self._dirty:
            self._schedule_touched()
        due: list[Tunnel] = []
        while (earliest := self._earliest()) is not None and earliest[0] <= now:
            heapq.heappop(self._timers)
            peer = earliest[1]
            del self._deadlines[peer]
            due.append(self._live[peer])
        for tunnel in due:
            tunnel.handle_timer(now)
            if tunnel.is_closed and tunnel.is_drained(now):
                self._forget(tunnel)
            else:
                self._dirty[tunnel.peer] = tunnel  # its datagrams, and its next deadline
        while self._dormant:
            tunnel = next(iter(self._dormant.values()))
            timer = tunnel.get_timer()
            if timer is None or timer > now:
                break
            tunnel.handle_timer(now)
            if tunnel.is_closed:  # never confirmed: no one to drain anything for
                self._forget(tunnel)
            else:
                self._wake(tunnel)

    def _release_sessions(self, tunnel: Tunnel) -> None:
        for session in tunnel.sessions():
            self.release_index(session.local_index)

    def _forget(self, tunnel: Tunnel) -> None:
        peer = tunnel.peer
        self._release_sessions(tunnel)
        del self._tunnels[peer]
        self._live.pop(peer, None)
        self._dormant.pop(peer, None)
        self._deadlines.pop(peer, None)
        if self._dirty.get(peer) is tunnel:
            del self._dirty[peer]
        if not tunnel.ever_established:
            # Nothing to protect against replays for: keep memory bounded under floods.
            self._accepted_timestamps.pop(peer, None)

    @property
    def dropped(self) -> int:
        """Datagrams dropped before reaching a tunnel, all reasons together (cheap)."""
        return self._drops.total()

    @property
    def drops(self) -> dict[str, int]:
        return dict(self._drops)

    def statistics(self) -> EndpointStatistics:
        return EndpointStatistics(
            tunnels=tuple(t.statistics() for t in self._tunnels.values()),
            datagrams_received=self._received,
            datagrams_sent=self._sent,
            drops=dict(self._drops),
        )
