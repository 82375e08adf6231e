"""One tunnel per peer: sessions, handshakes, paths, timers and closing.

`Tunnel` is driven by its `Endpoint` (which demultiplexes datagrams by session
index and runs the responder half of handshakes); applications reach it
through the stream calls (`open_stream`, `send_stream`, `read_stream`, ...).
Streams, acknowledgements, loss recovery and flow control are the job of its
`Connection`, which the tunnel replaces when the peer restarts; the tunnel
seals and opens the packets the connection fills and reads.
Everything takes an explicit ``now``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final, Protocol

from .._address import Address
from .._exceptions import FrameError, LocalProtocolError, NoiseDecryptError, RemoteProtocolError
from .._identity import PublicIdentity
from ._connection import Connection, ConnectionOwner
from ._cookies import COOKIE_LIFETIME, CookieReply, cookie_key
from ._events import (
    ERROR_IDLE_TIMEOUT,
    ERROR_NO_ERROR,
    ERROR_PEER_RESTARTED,
    ERROR_PROTOCOL,
    ERROR_TUNNEL_CLOSED,
    HandshakeCompleted,
    HandshakeFailed,
    PathChanged,
    StreamMoved,
    TunnelClosed,
)
from ._frames import (
    Close,
    Frame,
    PathChallenge,
    PathResponse,
    encode_frame,
    is_ack_eliciting,
    parse_frames,
)
from ._packet import (
    DATA_HEADER_SIZE,
    HandshakeResponse,
    HelloPayload,
    TransportParameters,
    is_relay_addr,
)
from ._sessions import AcceptedInitiation, LocalKeys, PendingInitiation, Session
from ._streams import stream_id_parity

if TYPE_CHECKING:
    from ._stats import TunnelStatistics

__all__ = ["Tunnel", "TunnelState"]

_TAG: Final = 16
_CLOSE_REPEATS: Final = 2
_MAX_CHALLENGES: Final = 8
_MAX_UNCONFIRMED: Final = 3
_PTO_REHANDSHAKE: Final = 4  # consecutive probe timeouts before we suspect a peer restart
_SILENCE_PTOS: Final = 4  # ...or this many probe intervals without a word from the peer
_MIN_SILENCE: Final = 1.0  # seconds, at least
# How long the initiator waits for data of its own to confirm new keys before it sends
# a PING just for that: a connect is nearly always followed at once by a request.
CONFIRM_DELAY: Final = 0.005


class TunnelState:
    IDLE: Final = "idle"  # no keys, no handshake in progress
    HANDSHAKING: Final = "handshaking"
    ESTABLISHED: Final = "established"
    CLOSED: Final = "closed"


class _Owner(ConnectionOwner, Protocol):
    """What a tunnel needs from its endpoint (implemented by `Endpoint`)."""

    keys: LocalKeys
    boot_id: int

    def new_index(self, tunnel: Tunnel) -> int: ...
    def release_index(self, index: int) -> None: ...
    def timestamp(self, now: float) -> int: ...
    def count_drop(self, reason: str) -> None: ...
    def touch(self, tunnel: Tunnel) -> None: ...


class Tunnel:
    """The encrypted, reliable, multiplexed connection with one peer."""

    def __init__(self, owner: _Owner, peer: bytes, remote_addr: tuple[str, int]) -> None:
        self._owner = owner
        self._config = owner.config
        self.peer = peer
        self.remote_addr = remote_addr
        self.peer_identity: PublicIdentity | None = None
        self.peer_address: Address | None = None
        self.peer_boot_id: int | None = None
        self.state: str = TunnelState.IDLE
        self._parity = stream_id_parity(owner.keys.static.public, peer)
        self._session: Session | None = None  # keys we send with
        # Responder sessions awaiting confirmation, oldest first: the initiator may have
        # retried, and it keeps whichever of our responses reaches it first.
        self._unconfirmed: list[Session] = []
        self._unconfirmed_until: float | None = None  # a responder-only tunnel gives up then
        self._cookie: tuple[bytes, float] | None = None  # from the peer, while it is under load
        self._previous: Session | None = None
        self._previous_until = 0.0
        self._pending: dict[int, PendingInitiation] = {}
        self._handshake_started: float | None = None
        self._handshake_retry_at: float | None = None
        self._handshake_interval = self._config.handshake_retry
        self._last_received = 0.0
        self._last_sent = 0.0
        self._waiting_since: float | None = None  # first eliciting send the peer has not answered
        self._confirm_at: float | None = None  # when a PING confirms new keys, if data has not
        self._close_frame: Close | None = None
        self._close_repeats = 0
        self._closed_at: float | None = None
        self._challenges: dict[bytes, tuple[str, int]] = {}  # outstanding PATH_CHALLENGEs
        self.candidates: list[tuple[str, int]] = []  # more addresses each initiation goes to
        self._responses: list[tuple[bytes, tuple[str, int]]] = []
        self._raw_out: list[tuple[bytes, tuple[str, int]]] = []
        self._directed: list[tuple[Frame, tuple[str, int]]] = []
        self.stats_handshakes = 0
        self.stats_rekeys = 0
        self.stats_path_changes = 0
        self._next_pn = 0  # never reset, not even with the connection: nonces stay unique
        self._next_session_restarted = False  # the unconfirmed session's peer restarted
        self._conn = Connection(owner, peer, self._parity)  # replaced when the peer restarts

    # -- public stream API -------------------------------------------------------

    @property
    def is_established(self) -> bool:
        return self.state == TunnelState.ESTABLISHED

    @property
    def is_closed(self) -> bool:
        return self.state == TunnelState.CLOSED

    def connect(self, now: float) -> None:
        """Start a handshake unless one is running or keys already exist."""
        self._check_open()
        self._owner.touch(self)
        if self.state == TunnelState.IDLE:
            self._start_handshake(now)

    def open_stream(self, port: int, now: float) -> int:
        """A new stream to `port`; costs no round trip (the first frame names the port)."""
        self._check_open()
        self._owner.touch(self)
        stream_id = self._conn.open_stream(port)
        if self.state == TunnelState.IDLE and not self._unconfirmed:
            self._start_handshake(now)
        return stream_id

    def send_stream(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue `data` (and optionally the FIN) on a stream; sends as windows allow."""
        self._owner.touch(self)
        self._conn.send_stream(stream_id, data, end_stream=end_stream)

    def send_buffer_available(self, stream_id: int) -> int:
        """How many more bytes `send_stream` should take before the caller waits."""
        return self._conn.send_buffer_available(stream_id)

    def read_stream(self, stream_id: int, max_bytes: int = -1, *, now: float) -> bytes:
        """In-order bytes now readable (b"" when none, or at the end: see `stream_at_eof`)."""
        self._owner.touch(self)  # reading may open the window: a MAX_DATA to send
        return self._conn.read_stream(stream_id, max_bytes, now)

    def stream_at_eof(self, stream_id: int) -> bool:
        return self._conn.stream_at_eof(stream_id)

    def reset_stream(self, stream_id: int, error_code: int = ERROR_NO_ERROR) -> None:
        """Abandon our sending side (RESET_STREAM)."""
        self._owner.touch(self)
        self._conn.reset_stream(stream_id, error_code)

    def stop_sending(self, stream_id: int, error_code: int = ERROR_NO_ERROR) -> None:
        """Ask the peer to stop sending on this stream (we will not read more)."""
        self._owner.touch(self)
        self._conn.stop_sending(stream_id, error_code)

    @property
    def has_unacked_data(self) -> bool:
        """Some stream still owes the peer bytes or a FIN (what a graceful close waits for)."""
        return self.state == TunnelState.ESTABLISHED and self._conn.delivering

    @property
    def smoothed_rtt(self) -> float:
        """The smoothed RTT in seconds (the configured initial RTT before a sample)."""
        return self._conn.rtt.smoothed_rtt

    @property
    def wants_to_send(self) -> bool:
        """Frames wait for a packet (so the driver should call `datagrams_to_send`)."""
        return self._conn.wants_to_send

    def ping(self) -> None:
        """Send an ACK-eliciting PING soon (e.g. to show the peer a new path at once)."""
        if self.state == TunnelState.ESTABLISHED:
            self._owner.touch(self)
            self._conn.queue_ping()

    def stream_ids(self) -> list[int]:
        return self._conn.stream_ids()

    def close(self, now: float, error_code: int = ERROR_NO_ERROR, reason: str = "") -> None:
        """Tell the peer (CLOSE, sent at most a few times) and end every stream."""
        if self.state == TunnelState.CLOSED:
            return
        self._owner.touch(self)
        if self._session is not None:
            self._close_frame = Close(error_code, reason)
        self._finish(now, error_code, reason or "closed locally", by_peer=False)

    # -- handshake ------------------------------------------------------------------

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
        index = self._owner.new_index(self)
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
            self._owner.touch(self)
            self._send_initiation(now)

    def use_path(self, addr: tuple[str, int]) -> None:
        """Send to `addr` from now on (before the handshake, or to fall back to the relay)."""
        self._owner.touch(self)
        self.remote_addr = addr

    def probe_path(self, addr: tuple[str, int]) -> None:
        """Challenge `addr`; if the peer answers from there, the tunnel moves to it."""
        if self.state != TunnelState.ESTABLISHED or addr == self.remote_addr:
            return
        for token in [t for t, a in self._challenges.items() if a == addr]:
            del self._challenges[token]  # a probe is a fresh challenge: the last may be lost
        self._owner.touch(self)
        self._challenge_path(addr)

    @property
    def awaiting_confirmation(self) -> bool:
        """We answered the peer's handshake and it has not used the keys yet."""
        return self._unconfirmed_until is not None

    @property
    def ever_established(self) -> bool:
        return self.stats_handshakes > 0

    @property
    def is_relayed(self) -> bool:
        return is_relay_addr(self.remote_addr)

    def should_yield_to(self, now: float) -> bool:
        """Simultaneous initiation: True when our own pending initiation wins."""
        return bool(self._pending) and self._owner.keys.static.public < self.peer

    def handle_initiation(
        self, accepted: AcceptedInitiation, addr: tuple[str, int], now: float
    ) -> bytes:
        """Answer an authenticated initiation; returns the response datagram."""
        if self._pending:  # the peer's initiation wins (the caller checked the tie-break)
            self._abandon_initiations()
        index = self._owner.new_index(self)
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

    # -- receiving ---------------------------------------------------------------------

    def handle_data(
        self, session: Session, counter: int, datagram: bytes, addr: tuple[str, int], now: float
    ) -> None:
        plaintext = session.open(counter, datagram)
        if plaintext is None:
            self._owner.count_drop("replay_or_auth")
            return
        if self.state == TunnelState.CLOSED:
            # Answer a straggler with our CLOSE, a bounded number of times.
            if self._close_repeats < _CLOSE_REPEATS:
                self._close_repeats += 1
                self._send_close_again(session)
            return
        if session in self._unconfirmed:  # the initiator has the keys: confirmed
            self._unconfirmed_until = None
            for other in self._unconfirmed:
                if other is not session:
                    self._owner.release_index(other.local_index)
            self._unconfirmed.clear()
            restarted, self._next_session_restarted = self._next_session_restarted, False
            self._activate(session, now, restarted=restarted)
        try:
            frames = parse_frames(plaintext)
        except FrameError:
            self._owner.count_drop("malformed")
            return
        self._conn.on_packet_received(len(datagram))
        self._last_received = now
        self._waiting_since = None
        if addr != self.remote_addr:
            self._on_new_path(addr, counter)
        ack_eliciting = False
        try:
            for frame in frames:
                if is_ack_eliciting(frame):
                    ack_eliciting = True
                self._handle_frame(frame, addr, now)
                if self.state == TunnelState.CLOSED:
                    return  # nothing after a CLOSE counts
        except RemoteProtocolError as exc:  # flow control, frames, impossible ACKs
            self._protocol_error(now, str(exc))
            return
        self._conn.record_received(counter, ack_eliciting, now)

    def _handle_frame(self, frame: Frame, addr: tuple[str, int], now: float) -> None:
        if isinstance(frame, PathChallenge):
            self._responses.append((frame.data, addr))
        elif isinstance(frame, PathResponse):
            self._on_path_response(frame, addr)
        elif isinstance(frame, Close):
            self._finish(now, frame.error_code, frame.reason or "closed by peer", by_peer=True)
        else:
            self._conn.handle_frame(frame, now)

    # -- paths ---------------------------------------------------------------------------

    def _on_new_path(self, addr: tuple[str, int], counter: int) -> None:
        if addr in self._challenges.values():
            return
        if self._keeps_direct_path_over(addr):
            return  # stragglers through the relay
        self._challenge_path(addr)

    def _keeps_direct_path_over(self, addr: tuple[str, int]) -> bool:
        """A working direct path is never given up for the relay (only a silent one is)."""
        return is_relay_addr(addr) and not self.is_relayed and self._conn.pto_streak < 2

    def _challenge_path(self, addr: tuple[str, int]) -> None:
        if len(self._challenges) >= _MAX_CHALLENGES:
            del self._challenges[next(iter(self._challenges))]
        token = os.urandom(8)
        self._challenges[token] = addr
        self._directed.append((PathChallenge(token), addr))

    def _on_path_response(self, frame: PathResponse, addr: tuple[str, int]) -> None:
        target = self._challenges.get(frame.data)
        if target is None:
            return
        if self._keeps_direct_path_over(target):
            del self._challenges[frame.data]
            return  # the direct path came back meanwhile: keep it
        old = self.remote_addr
        self.remote_addr = target
        self._challenges.clear()
        if old != self.remote_addr:
            self.stats_path_changes += 1
            self._owner.emit(PathChanged(self.peer, old, self.remote_addr))

    # -- closing -----------------------------------------------------------------------

    def _protocol_error(self, now: float, reason: str) -> None:
        if self._session is not None:
            self._close_frame = Close(ERROR_PROTOCOL, reason[:200])
        self._finish(now, ERROR_PROTOCOL, f"protocol violation by peer: {reason}", by_peer=False)

    def _finish(self, now: float, code: int, reason: str, *, by_peer: bool) -> None:
        if self.state == TunnelState.CLOSED:
            return
        if self._close_frame is not None and not by_peer and self._session is not None:
            self._raw_out.append(
                (self._seal_frames(self._session, [self._close_frame]), self.remote_addr)
            )
        self.state = TunnelState.CLOSED
        self._closed_at = now
        self._conn.close(ERROR_TUNNEL_CLOSED, reason)
        self._abandon_initiations()
        self._owner.emit(TunnelClosed(self.peer, code, reason, by_peer))

    def _send_close_again(self, session: Session) -> None:
        if self._close_frame is not None:
            self._raw_out.append(
                (self._seal_frames(session, [self._close_frame]), self.remote_addr)
            )

    def _check_open(self) -> None:
        if self.state == TunnelState.CLOSED:
            raise LocalProtocolError("the tunnel is closed")

    # -- timers ----------------------------------------------------------------------------

    def _keepalive_due(self) -> float | None:
        ka = self._config.keepalive
        if ka is None or self.state != TunnelState.ESTABLISHED:
            return None
        if not (self._conn.stream_count or self._config.persistent_keepalive):
            return None
        return max(self._last_sent, self._last_received) + ka

    def get_timer(self) -> float | None:
        """The earliest time `handle_timer` must run, or None.

        It runs after every flush, so it keeps a running minimum (no list),
        and works out the restart suspicion, which costs a probe-interval
        computation, only when that could come first.
        """
        state = self.state
        if state == TunnelState.CLOSED:
            assert self._closed_at is not None
            return self._closed_at + 3 * max(self._conn.pto_interval(), 0.1)
        cfg = self._config
        best: float | None = None
        if self._handshake_started is not None:
            best = self._handshake_started + cfg.handshake_timeout
            retry = self._handshake_retry_at
            if retry is not None and retry < best:
                best = retry
        if state == TunnelState.ESTABLISHED:
            idle = self._last_received + cfg.idle_timeout
            if best is None or idle < best:
                best = idle
            deadline = self._conn.next_deadline(self._last_sent)
            if deadline is not None and deadline < best:
                best = deadline
            keepalive = self._keepalive_due()
            if keepalive is not None and keepalive < best:
                best = keepalive
            waiting = self._waiting_since
            # The suspicion comes _MIN_SILENCE after `waiting` at the earliest.
            if waiting is not None and waiting + _MIN_SILENCE < best:
                suspect = self._suspect_restart_at()
                if suspect is not None and suspect < best:
                    best = suspect
        if self._previous is not None and (best is None or self._previous_until < best):
            best = self._previous_until
        unconfirmed = self._unconfirmed_until
        if unconfirmed is not None and (best is None or unconfirmed < best):
            best = unconfirmed
        confirm = self._confirm_at
        if confirm is not None and (best is None or confirm < best):
            best = confirm
        return best

    def handle_timer(self, now: float) -> None:
        if self.state == TunnelState.CLOSED:
            return
        cfg = self._config
        if self._handshake_started is not None:
            if now >= self._handshake_started + cfg.handshake_timeout:
                self._handshake_timed_out(now)
                if self.state == TunnelState.CLOSED:
                    return
            elif self._handshake_retry_at is not None and now >= self._handshake_retry_at:
                self._send_initiation(now)
        if self._previous is not None and now >= self._previous_until:
            self._owner.release_index(self._previous.local_index)
            self._previous = None
        if self._unconfirmed_until is not None and now >= self._unconfirmed_until:
            self._unconfirmed_until = None
            if self.state == TunnelState.IDLE and not self._pending:
                # We answered, and the initiator never used the keys: forget it all.
                for session in self._unconfirmed:
                    self._owner.release_index(session.local_index)
                self._unconfirmed.clear()
                self._finish(now, ERROR_TUNNEL_CLOSED, "handshake never confirmed", by_peer=False)
                return
        if self.state != TunnelState.ESTABLISHED:
            return
        if now >= self._last_received + cfg.idle_timeout:
            self._finish(now, ERROR_IDLE_TIMEOUT, "idle timeout", by_peer=False)
            return
        probed_out = self._conn.handle_loss_timer(now) and self._conn.pto_streak >= _PTO_REHANDSHAKE
        suspect = self._suspect_restart_at()
        if (probed_out or (suspect is not None and now >= suspect)) and not self._pending:
            # Silence after repeated probes, or while requests keep coming (each re-arms
            # the probe timer): the peer may have restarted and forgotten our session.
            # A fresh handshake finds out.
            self._conn.pto_streak = 0
            self._start_handshake(now)
        if self._confirm_at is not None and now >= self._confirm_at:
            # Sent whatever the congestion window says: a window full of packets to a
            # session the peer forgot must not keep our new keys unconfirmed until
            # the peer gives up on them (its handshake timeout).
            self._confirm_at = None
            self._conn.probe()
        keepalive = self._keepalive_due()
        if keepalive is not None and now >= keepalive:
            self._conn.queue_ping()

    def _suspect_restart_at(self) -> float | None:
        """When silence after our unanswered packets means the peer may have restarted."""
        if self._waiting_since is None or self._pending:
            return None
        return self._waiting_since + max(_SILENCE_PTOS * self._conn.pto_interval(), _MIN_SILENCE)

    def _handshake_timed_out(self, now: float) -> None:
        self._abandon_initiations()
        if self.state == TunnelState.ESTABLISHED:
            return  # a rekey failed; the current keys still work until idle timeout
        reason = f"handshake timed out after {self._config.handshake_timeout:g} s"
        self._owner.emit(HandshakeFailed(self.peer, reason))
        self._finish(now, ERROR_TUNNEL_CLOSED, reason, by_peer=False)

    def is_drained(self, now: float) -> bool:
        """Closed long enough that late packets no longer deserve an answer."""
        return self._closed_at is not None and now >= self._closed_at + 3 * max(
            self._conn.pto_interval(), 0.1
        )

    def statistics(self) -> TunnelStatistics:
        from ._stats import TunnelStatistics

        conn = self._conn
        rtt = conn.rtt
        return TunnelStatistics(
            peer=self.peer,
            peer_address=self.peer_address,
            remote_addr=self.remote_addr,
            state=self.state,
            smoothed_rtt=rtt.smoothed_rtt,
            min_rtt=rtt.min_rtt,
            latest_rtt=rtt.latest_rtt,
            rttvar=rtt.rttvar,
            congestion_window=conn.congestion.congestion_window,
            bytes_in_flight=conn.congestion.bytes_in_flight,
            packets_sent=conn.stats_packets_sent,
            packets_received=conn.stats_packets_received,
            bytes_sent=conn.stats_bytes_sent,
            bytes_received=conn.stats_bytes_received,
            packets_lost=conn.stats_lost_packets,
            frames_retransmitted=conn.stats_retransmitted_frames,
            streams=conn.stream_count,
            handshakes=self.stats_handshakes,
            rekeys=self.stats_rekeys,
            path_changes=self.stats_path_changes,
            path="relayed" if self.is_relayed else "direct",
        )

    # -- sending ---------------------------------------------------------------------------

    def _seal_frames(self, session: Session, frames: list[Frame]) -> bytes:
        payload = bytearray()
        for f in frames:
            encode_frame(f, payload)
        pn = self._next_pn
        self._next_pn += 1
        return session.seal(pn, bytes(payload))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        session = self._session
        if (
            self.state == TunnelState.ESTABLISHED
            and session is not None
            and self._conn.wants_to_send
            and (
                now - session.created >= self._config.rekey_after_time
                or session.sent >= self._config.rekey_after_messages
            )
            and not self._pending
        ):  # rekey on use, like WireGuard: an idle tunnel is left to its idle timeout
            self._start_handshake(now)
        out = self._raw_out
        self._raw_out = []
        if self.state == TunnelState.CLOSED or session is None:
            return out
        budget = self._config.max_datagram_size - DATA_HEADER_SIZE - _TAG
        if self._responses:
            for data, addr in self._responses:
                out.append((self._send_packet(session, [PathResponse(data)], now), addr))
            self._responses.clear()
        if self._directed:
            for frame, addr in self._directed:
                out.append((self._send_packet(session, [frame], now), addr))
            self._directed.clear()
        conn = self._conn
        while True:
            if not conn.has_work(now):
                # Most flushes end here, many at once: no empty packet is built,
                # but congestion control still hears what `fill` would tell it.
                conn.on_nothing_to_send(now)
                break
            frames, eliciting = conn.fill(budget, now)
            if not frames:
                break
            out.append((self._send_packet(session, frames, now, eliciting), self.remote_addr))
            if not eliciting:
                break
        return out

    def _send_packet(
        self, session: Session, frames: list[Frame], now: float, eliciting: bool | None = None
    ) -> bytes:
        """Seal `frames` as the next packet and tell the connection it left."""
        pn = self._next_pn
        datagram = self._seal_frames(session, frames)
        self._conn.on_packet_sent(pn, frames, len(datagram), now, eliciting)
        self._last_sent = now
        if eliciting:  # lost, it is probed for and resent: it confirms our keys
            self._confirm_at = None
        if self._waiting_since is None and eliciting is not False:
            self._waiting_since = now
        return datagram
