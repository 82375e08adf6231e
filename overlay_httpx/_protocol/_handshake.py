"""The key exchange of a tunnel: initiating, answering, installing and rotating sessions.

`TunnelHandshake` is the half of `Tunnel` that runs its Noise handshakes
(the first, rekeys, and new ones after a peer restart), keeps its sessions
and confirms new keys; `Tunnel` (`_tunnel.py`) is the half that moves
packets, follows paths, runs timers and closes. The two share one object's
state, declared below and set up by `Tunnel.__init__`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol, cast

from .._address import Address
from .._exceptions import FrameError, NoiseDecryptError
from .._identity import PublicIdentity
from ._config import TunnelConfig
from ._connection import Connection, ConnectionOwner
from ._cookies import COOKIE_LIFETIME, CookieReply, cookie_key
from ._events import (
    ERROR_PEER_RESTARTED,
    ERROR_TUNNEL_CLOSED,
    HandshakeCompleted,
    HandshakeFailed,
    StreamMoved,
)
from ._packet import HandshakeResponse, HelloPayload, TransportParameters
from ._sessions import AcceptedInitiation, LocalKeys, PendingInitiation, Session

if TYPE_CHECKING:
    from ._tunnel import Tunnel

__all__ = ["CONFIRM_DELAY", "TunnelHandshake", "TunnelOwner", "TunnelState"]

_MAX_UNCONFIRMED: Final = 3
# How long the initiator waits for data of its own to confirm new keys before it sends
# a PING just for that: a connect is nearly always followed at once by a request.
CONFIRM_DELAY: Final = 0.005


class TunnelState:
    """Where a tunnel stands (plain strings: they read well in logs and statistics)."""

    IDLE: Final = "idle"  # no keys, no handshake in progress
    HANDSHAKING: Final = "handshaking"
    ESTABLISHED: Final = "established"
    CLOSED: Final = "closed"


class TunnelOwner(ConnectionOwner, Protocol):
    """What a tunnel needs from its endpoint (implemented by `Endpoint`)."""

    keys: LocalKeys
    boot_id: int

    def new_index(self, tunnel: Tunnel) -> int: ...
    def release_index(self, index: int) -> None: ...
    def timestamp(self, now: float) -> int: ...
    def count_drop(self, reason: str) -> None: ...
    def touch(self, tunnel: Tunnel) -> None: ...


class TunnelHandshake:
    """Handshakes and sessions of one `Tunnel` (see the module docstring)."""

    # Shared with `Tunnel`, which sets them up.
    _owner: TunnelOwner
    _config: TunnelConfig
    peer: bytes
    remote_addr: tuple[str, int]
    state: str
    peer_identity: PublicIdentity | None
    peer_address: Address | None
    peer_boot_id: int | None
    candidates: list[tuple[str, int]]
    stats_handshakes: int
    stats_rekeys: int
    _parity: int
    _session: Session | None
    _unconfirmed: list[Session]
    _unconfirmed_until: float | None
    _cookie: tuple[bytes, float] | None
    _previous: Session | None
    _previous_until: float
    _pending: dict[int, PendingInitiation]
    _handshake_started: float | None
    _handshake_retry_at: float | None
    _handshake_interval: float
    _last_received: float
    _raw_out: list[tuple[bytes, tuple[str, int]]]
    _next_session_restarted: bool
    _confirm_at: float | None
    _conn: Connection

    def _finish(self, now: float, code: int, reason: str, *, by_peer: bool) -> None:
        raise NotImplementedError  # `Tunnel._finish`

    @property
    def _whole(self) -> Tunnel:
        """This object as the `Tunnel` it is (what the endpoint keeps by index)."""
        return cast("Tunnel", self)

    def _params(self) -> TransportParameters:
        cfg = self._config
        return TransportParameters(
            max_streams=cfg.max_streams,
            initial_max_data=cfg.initial_max_data,
            initial_max_stream_data=cfg.initial_max_stream_data,
            max_datagram_size=cfg.max_datagram_size,
            idle_timeout_ms=int(cfg.idle_timeout * 1000),
        )

    def _hello(self, now: float, *, initiator: bool) -> bytes:
        stamp = self._owner.timestamp(now) if initiator else 0
        return self._owner.keys.hello(stamp, self._owner.boot_id, self._params())

    def _start_handshake(self, now: float) -> None:
        if self.state == TunnelState.IDLE:
            self.state = TunnelState.HANDSHAKING
        if self._handshake_started is None:
            self._handshake_started = now
            self._handshake_interval = self._config.handshake_retry
        self._send_initiation(now)

    def _send_initiation(self, now: float) -> None:
        index = self._owner.new_index(self._whole)
        cookie = None
        if self._cookie is not None and now - self._cookie[1] < COOKIE_LIFETIME:
            cookie = self._cookie[0]
        pending, datagram = PendingInitiation.start(
            self._owner.keys, self.peer, index, self._hello(now, initiator=True), cookie
        )
        self._pending[index] = pending
        while len(self._pending) > 3:  # keep the latest few for late responses
            old = next(iter(self._pending))
            del self._pending[old]
            self._owner.release_index(old)
        self._raw_out.append((datagram, self.remote_addr))
        for addr in self.candidates:
            if addr != self.remote_addr:
                self._raw_out.append((datagram, addr))
        self._handshake_retry_at = now + self._handshake_interval
        self._handshake_interval *= 2

    def _abandon_initiations(self) -> None:
        for index in self._pending:
            self._owner.release_index(index)
        self._pending.clear()
        self._handshake_started = None
        self._handshake_retry_at = None

    def handle_response(
        self, response: HandshakeResponse, addr: tuple[str, int], now: float
    ) -> None:
        pending = self._pending.get(response.receiver_index)
        if pending is None or self.state == TunnelState.CLOSED:
            self._owner.count_drop("unknown_session")
            return
        if response.refusal:
            self._on_refusal(pending, response, now)
            return
        try:
            session, hello, identity = pending.finish(response, now)
        except (NoiseDecryptError, FrameError):
            self._owner.count_drop("auth_failure")
            return
        del self._pending[response.receiver_index]
        self._abandon_initiations()
        self.remote_addr = addr
        self.candidates.clear()
        self._install(session, hello, identity, now)
        # Key confirmation: the responder starts sending once it hears from us. Our first
        # ack-eliciting packet confirms; the request that usually follows a connect at
        # once saves a datagram each way (a lone PING, and the ACK that two ack-eliciting
        # packets would call for at once).
        self._confirm_at = now + CONFIRM_DELAY

    def _on_refusal(
        self, pending: PendingInitiation, response: HandshakeResponse, now: float
    ) -> None:
        try:
            reason = pending.read_refusal(response)
        except (NoiseDecryptError, FrameError):
            self._owner.count_drop("auth_failure")
            return
        self._abandon_initiations()
        if self.state == TunnelState.ESTABLISHED:
            return  # a rekey refused: the current keys still work until they time out
        text = f"refused the tunnel: {reason}" if reason else "refused the tunnel"
        self._owner.emit(HandshakeFailed(self.peer, text, refused=True))
        self._finish(now, ERROR_TUNNEL_CLOSED, text, by_peer=True)

    def handle_cookie(self, data: bytes, index: int, now: float) -> None:
        """The peer is under load: keep its cookie and initiate again, proving our address."""
        pending = self._pending.get(index)
        if pending is None or self.state == TunnelState.CLOSED:
            self._owner.count_drop("unknown_session")
            return
        cookie = CookieReply.open(cookie_key(self.peer), data, pending.mac1)
        if cookie is None:
            self._owner.count_drop("auth_failure")
            return
        fresh = self._cookie is None or self._cookie[0] != cookie
        self._cookie = (cookie, now)
        if fresh:
            self._send_initiation(now)

    def retry_handshake(self, now: float) -> None:
        """Send a fresh initiation now (to `remote_addr` and every candidate), if one is running."""
        if self._handshake_started is not None and self.state != TunnelState.CLOSED:
            self._owner.touch(self._whole)
            self._send_initiation(now)

    @property
    def awaiting_confirmation(self) -> bool:
        """We answered the peer's handshake and it has not used the keys yet."""
        return self._unconfirmed_until is not None

    @property
    def ever_established(self) -> bool:
        return self.stats_handshakes > 0

    def should_yield_to(self, now: float) -> bool:
        """Simultaneous initiation: True when our own pending initiation wins."""
        return bool(self._pending) and self._owner.keys.static.public < self.peer

    def handle_initiation(
        self, accepted: AcceptedInitiation, addr: tuple[str, int], now: float
    ) -> bytes:
        """Answer an authenticated initiation; returns the response datagram."""
        if self._pending:  # the peer's initiation wins (the caller checked the tie-break)
            self._abandon_initiations()
        index = self._owner.new_index(self._whole)
        session, datagram = accepted.respond(
            self._owner.keys, index, self._hello(now, initiator=False), now
        )
        self.remote_addr = addr
        self._unconfirmed.append(session)
        if len(self._unconfirmed) > _MAX_UNCONFIRMED:
            self._owner.release_index(self._unconfirmed.pop(0).local_index)
        if self.state != TunnelState.ESTABLISHED:
            self._unconfirmed_until = now + self._config.handshake_timeout
        restarted = self._install_identity(accepted.hello, accepted.identity, now)
        self._next_session_restarted = restarted or self._next_session_restarted
        return datagram

    def _install_identity(self, hello: HelloPayload, identity: PublicIdentity, now: float) -> bool:
        restarted = self.peer_boot_id is not None and hello.boot_id != self.peer_boot_id
        if restarted:
            self._peer_restarted(now)
        self.peer_boot_id = hello.boot_id
        self.peer_identity = identity
        self.peer_address = hello.address
        self._conn.on_peer_params(hello.params)
        self._last_received = now
        return restarted

    def _install(
        self, session: Session, hello: HelloPayload, identity: PublicIdentity, now: float
    ) -> None:
        self._activate(session, now, restarted=self._install_identity(hello, identity, now))

    def _activate(self, session: Session, now: float, *, restarted: bool) -> None:
        """Send with `session` from now on, and say so (first handshake, rekey or restart)."""
        assert self.peer_identity is not None
        assert self.peer_address is not None
        rekey = self.state == TunnelState.ESTABLISHED and not restarted
        self._rotate(session, now)
        self.state = TunnelState.ESTABLISHED
        self.stats_handshakes += 1
        if rekey:
            self.stats_rekeys += 1
        self._owner.emit(
            HandshakeCompleted(
                self.peer,
                self.peer_address,
                self.peer_identity,
                self.remote_addr,
                rekey,
                restarted,
            )
        )

    def _rotate(self, session: Session, now: float) -> None:
        if self._previous is not None:
            self._owner.release_index(self._previous.local_index)
        self._previous = self._session
        self._previous_until = now + max(3 * self._conn.pto_interval(), 1.0)
        self._session = session
        self._conn.pto_streak = 0

    def _peer_restarted(self, now: float) -> None:
        """Start the connection afresh: the peer forgot it.

        Streams the peer never acknowledged or answered are replayed on the new
        connection (the peer cannot have acted on them), so a stream opened
        just after the restart, before we noticed it, still succeeds. Every
        other stream ends with `ERROR_PEER_RESTARTED`.
        """
        carried = self._conn.take_unstarted()
        self._conn.close(ERROR_PEER_RESTARTED, "peer restarted")
        self._conn = Connection(self._owner, self.peer, self._parity)
        for old_id, new_id in self._conn.adopt(carried):
            self._owner.emit(StreamMoved(self.peer, old_id, new_id))

    def sessions(self) -> list[Session]:
        return [s for s in (self._session, *self._unconfirmed, self._previous) if s is not None]

    def session_for(self, index: int) -> Session | None:
        """The session our `index` names (runs once per received packet)."""
        for session in (self._session, self._previous, *self._unconfirmed):
            if session is not None and session.local_index == index:
                return session
        return None

    def _handshake_timed_out(self, now: float) -> None:
        self._abandon_initiations()
        if self.state == TunnelState.ESTABLISHED:
            return  # a rekey failed; the current keys still work until idle timeout
        reason = f"handshake timed out after {self._config.handshake_timeout:g} s"
        self._owner.emit(HandshakeFailed(self.peer, reason))
        self._finish(now, ERROR_TUNNEL_CLOSED, reason, by_peer=False)
