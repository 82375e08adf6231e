"""One tunnel per peer: packets, paths, timers and closing.

`Tunnel` is driven by its `Endpoint` (which demultiplexes datagrams by session
index and runs the responder half of handshakes); applications reach it
through the stream calls (`open_stream`, `send_stream`, `read_stream`, ...).
Streams, acknowledgements, loss recovery and flow control are the job of its
`Connection`, which the tunnel replaces when the peer restarts; the tunnel
seals and opens the packets the connection fills and reads. Its handshakes
and sessions are the other half of the class, `TunnelHandshake`
(`_handshake.py`). Everything takes an explicit ``now``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

from .._address import Address
from .._exceptions import FrameError, LocalProtocolError, RemoteProtocolError
from .._identity import PublicIdentity
from ._connection import Connection
from ._events import (
    ERROR_IDLE_TIMEOUT,
    ERROR_NO_ERROR,
    ERROR_PROTOCOL,
    ERROR_TUNNEL_CLOSED,
    PathChanged,
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
from ._handshake import TunnelHandshake, TunnelOwner, TunnelState
from ._packet import (
    DATA_HEADER_SIZE,
    is_relay_addr,
)
from ._sessions import PendingInitiation, Session
from ._streams import stream_id_parity

if TYPE_CHECKING:
    from ._stats import TunnelStatistics

__all__ = ["Tunnel", "TunnelState"]

_TAG: Final = 16
_CLOSE_REPEATS: Final = 2
_MAX_CHALLENGES: Final = 8
_PTO_REHANDSHAKE: Final = 4  # consecutive probe timeouts before we suspect a peer restart
_SILENCE_PTOS: Final = 4  # ...or this many probe intervals without a word from the peer
_MIN_SILENCE: Final = 1.0  # seconds, at least


class Tunnel(TunnelHandshake):
    """The encrypted, reliable, multiplexed connection with one peer."""

    def __init__(self, owner: TunnelOwner, peer: bytes, remote_addr: tuple[str, int]) -> None:
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
    def is_relayed(self) -> bool:
        return is_relay_addr(self.remote_addr)

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
