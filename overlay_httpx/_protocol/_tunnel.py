"""One tunnel per peer: sessions, reliable streams, loss recovery, timers.

`Tunnel` is driven by its `Endpoint` (which demultiplexes datagrams by session
index and runs the responder half of handshakes); applications reach it
through the stream calls (`open_stream`, `send_stream`, `read_stream`, ...).
Everything takes an explicit ``now``.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from .._address import Address
from .._exceptions import FrameError, LocalProtocolError, NoiseDecryptError, RemoteProtocolError
from .._identity import PublicIdentity
from ._config import TunnelConfig
from ._congestion import NewReno, Pacer
from ._events import (
    ERROR_IDLE_TIMEOUT,
    ERROR_NO_ERROR,
    ERROR_PEER_RESTARTED,
    ERROR_PORT_UNREACHABLE,
    ERROR_PROTOCOL,
    ERROR_TUNNEL_CLOSED,
    Event,
    HandshakeCompleted,
    HandshakeFailed,
    PathChanged,
    StreamOpened,
    StreamReadable,
    StreamReset,
    StreamStopSending,
    StreamWritable,
    TunnelClosed,
)
from ._frames import (
    Ack,
    Close,
    DataBlocked,
    Frame,
    MaxData,
    MaxStreamData,
    MaxStreams,
    Padding,
    PathChallenge,
    PathResponse,
    Ping,
    ResetStream,
    StopSending,
    Stream,
    StreamDataBlocked,
    encode_frame,
    encoded_size,
    is_ack_eliciting,
    parse_frames,
    stream_frame_overhead,
)
from ._packet import DATA_HEADER_SIZE, HandshakeResponse, HelloPayload, TransportParameters
from ._recovery import LossRecovery, SentPacket
from ._sessions import AcceptedInitiation, LocalKeys, PendingInitiation, Session
from ._streams import (
    FlowWindow,
    RecvBuffer,
    SendBuffer,
    SendCredit,
    _RangeSet,
    is_local_stream,
    stream_id_parity,
)

if TYPE_CHECKING:
    from ._stats import TunnelStatistics

__all__ = ["Tunnel", "TunnelState"]

_TAG: Final = 16
_MAX_ACK_RANGES: Final = 32
_ACK_EVERY: Final = 2
_CLOSE_REPEATS: Final = 2
_PTO_REHANDSHAKE: Final = 4  # consecutive probe timeouts before we suspect a peer restart


class TunnelState:
    IDLE: Final = "idle"  # no keys, no handshake in progress
    HANDSHAKING: Final = "handshaking"
    ESTABLISHED: Final = "established"
    CLOSED: Final = "closed"


@dataclass(slots=True)
class _Stream:
    stream_id: int
    port: int | None
    send: SendBuffer
    recv: RecvBuffer
    credit: SendCredit
    window: FlowWindow
    local: bool
    announced: bool = False  # StreamOpened emitted (peer streams) / port sent (ours)
    send_closed: bool = False  # reset by us or by STOP_SENDING
    recv_closed: bool = False  # reset by the peer, or EOF read
    reset_code: int | None = None  # RESET_STREAM we owe the peer (not yet sent)
    reset_unacked: bool = False  # RESET_STREAM sent, not yet acknowledged
    stop_code: int | None = None  # STOP_SENDING we owe the peer
    queued: bool = False
    writable_wanted: bool = False
    window_update: bool = False


class _Owner(Protocol):
    """What a tunnel needs from its endpoint (implemented by `Endpoint`)."""

    keys: LocalKeys
    config: TunnelConfig
    boot_id: int

    def new_index(self, tunnel: Tunnel) -> int: ...
    def release_index(self, index: int) -> None: ...
    def is_listening(self, port: int) -> bool: ...
    def timestamp(self, now: float) -> int: ...
    def emit(self, event: Event) -> None: ...
    def count_drop(self, reason: str) -> None: ...


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
        self._next_session: Session | None = None  # responder session awaiting confirmation
        self._previous: Session | None = None
        self._previous_until = 0.0
        self._pending: dict[int, PendingInitiation] = {}
        self._handshake_started: float | None = None
        self._handshake_retry_at: float | None = None
        self._handshake_interval = self._config.handshake_retry
        self._last_received = 0.0
        self._last_sent = 0.0
        self._close_frame: Close | None = None
        self._close_repeats = 0
        self._closed_at: float | None = None
        self._challenge: tuple[bytes, tuple[str, int]] | None = None
        self._responses: list[tuple[bytes, tuple[str, int]]] = []
        self._raw_out: list[tuple[bytes, tuple[str, int]]] = []
        self._directed: list[tuple[Frame, tuple[str, int]]] = []
        self.stats_handshakes = 0
        self.stats_rekeys = 0
        self.stats_path_changes = 0
        self._next_pn = 0  # never reset, not even with the connection: nonces stay unique
        self._next_session_restarted = False  # the unconfirmed session's peer restarted
        self._reset_connection()

    # -- connection state (reset when the peer restarts) -----------------------

    def _reset_connection(self) -> None:
        cfg = self._config
        self._congestion = NewReno(max_datagram_size=cfg.max_datagram_size)
        self._pacer = Pacer(max_datagram_size=cfg.max_datagram_size)
        self._recovery = LossRecovery(
            congestion=self._congestion,
            max_ack_delay=cfg.max_ack_delay,
            initial_rtt=cfg.initial_rtt,
            pacer=self._pacer,
        )
        self._streams: dict[int, _Stream] = {}
        self._send_queue: deque[int] = deque()
        self._control: list[Frame] = []
        self._next_local_stream = self._parity
        self._peer_streams_seen = -1  # highest peer stream id seen
        self._peer_streams_closed = 0
        self._peer_max_streams = cfg.max_streams  # until their hello says otherwise
        self._local_streams_opened = 0
        self._max_streams_sent = cfg.max_streams
        self._received = _RangeSet()
        self._largest_received = -1
        self._largest_received_time = 0.0
        self._ack_eliciting_unacked = 0
        self._ack_deadline: float | None = None
        self._conn_credit = SendCredit(cfg.initial_max_data)
        self._conn_sent = 0
        self._conn_window = FlowWindow(cfg.initial_max_data, maximum=cfg.max_data_window)
        self._conn_received = 0
        self._conn_consumed = 0
        self._max_data_update = False
        self._peer_stream_credit = cfg.initial_max_stream_data
        self._pto_streak = 0
        self._probes = 0  # probe packets owed: they go out even with a full window
        self._ack_only_sent = 0
        self.stats_bytes_sent = 0
        self.stats_bytes_received = 0
        self.stats_packets_sent = 0
        self.stats_packets_received = 0
        self.stats_retransmitted_frames = 0
        self.stats_lost_packets = 0

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
        if self.state == TunnelState.IDLE:
            self._start_handshake(now)

    def open_stream(self, port: int, now: float) -> int:
        """A new stream to `port`; costs no round trip (the first frame names the port)."""
        self._check_open()
        if not 0 <= port <= 0xFFFF:
            raise LocalProtocolError(f"port {port} out of range: expected 0..65535")
        if self._local_streams_opened >= self._peer_max_streams:
            raise LocalProtocolError(
                f"stream limit reached: the peer allows {self._peer_max_streams} streams"
            )
        stream_id = self._next_local_stream
        self._next_local_stream += 2
        self._local_streams_opened += 1
        self._streams[stream_id] = self._new_stream(stream_id, port, local=True)
        self._queue(self._streams[stream_id])
        if self.state == TunnelState.IDLE and self._next_session is None:
            self._start_handshake(now)
        return stream_id

    def send_stream(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue `data` (and optionally the FIN) on a stream; sends as windows allow."""
        stream = self._stream(stream_id)
        if stream.send_closed:
            raise LocalProtocolError(f"stream {stream_id} was reset; it cannot send")
        if data:
            stream.send.write(data)
        if end_stream:
            stream.send.finish()
        self._queue(stream)

    def send_buffer_available(self, stream_id: int) -> int:
        """How many more bytes `send_stream` should take before the caller waits."""
        stream = self._stream(stream_id)
        free = self._config.send_buffer_limit - stream.send.buffered
        if free <= 0:
            stream.writable_wanted = True
        return max(free, 0)

    def read_stream(self, stream_id: int, max_bytes: int = -1, *, now: float) -> bytes:
        """In-order bytes now readable (b"" when none, or at the end: see `stream_at_eof`)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return b""
        data = stream.recv.read(max_bytes)
        if data:
            rtt = self._recovery.rtt.smoothed_rtt or self._config.initial_rtt
            new = stream.window.on_consumed(stream.recv.read_offset, now, rtt)
            if new is not None:
                stream.window_update = True
                self._queue(stream)
            self._conn_consumed += len(data)
            if self._conn_window.on_consumed(self._conn_consumed, now, rtt) is not None:
                self._max_data_update = True
        if stream.recv.eof:
            stream.recv_closed = True
            self._maybe_forget(stream)
        return data

    def stream_at_eof(self, stream_id: int) -> bool:
        stream = self._streams.get(stream_id)
        return stream is None or stream.recv.eof or stream.recv_closed

    def reset_stream(self, stream_id: int, error_code: int = ERROR_NO_ERROR) -> None:
        """Abandon our sending side (RESET_STREAM)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.send_closed:
            return
        stream.send.reset()
        stream.send_closed = True
        stream.reset_code = error_code
        self._queue(stream)

    def stop_sending(self, stream_id: int, error_code: int = ERROR_NO_ERROR) -> None:
        """Ask the peer to stop sending on this stream (we will not read more)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.recv_closed:
            return
        stream.recv_closed = True
        stream.stop_code = error_code
        self._queue(stream)

    def stream_ids(self) -> list[int]:
        return list(self._streams)

    def close(self, now: float, error_code: int = ERROR_NO_ERROR, reason: str = "") -> None:
        """Tell the peer (CLOSE, sent at most a few times) and end every stream."""
        if self.state == TunnelState.CLOSED:
            return
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
        pending, datagram = PendingInitiation.start(
            self._owner.keys, self.peer, index, self._hello(now, initiator=True)
        )
        self._pending[index] = pending
        while len(self._pending) > 3:  # keep the latest few for late responses
            old = next(iter(self._pending))
            del self._pending[old]
            self._owner.release_index(old)
        self._raw_out.append((datagram, self.remote_addr))
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
        try:
            session, hello, identity = pending.finish(response, now)
        except (NoiseDecryptError, FrameError):
            self._owner.count_drop("auth_failure")
            return
        del self._pending[response.receiver_index]
        self._abandon_initiations()
        self.remote_addr = addr
        self._install(session, hello, identity, now)
        # Key confirmation: the responder starts sending once it hears from us.
        self._queue_ping()

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
        if self._next_session is not None:
            self._owner.release_index(self._next_session.local_index)
        self._next_session = session
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
        self._peer_max_streams = hello.params.max_streams
        if self._local_streams_opened == 0 and not self._streams:
            self._conn_credit = SendCredit(hello.params.initial_max_data)
        self._peer_stream_credit = hello.params.initial_max_stream_data
        for stream in self._streams.values():
            if stream.local and stream.send.highest_sent == 0:
                stream.credit.update(hello.params.initial_max_stream_data)
        self._conn_credit.update(hello.params.initial_max_data)
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
        self._previous_until = now + max(3 * self._recovery.pto_interval(), 1.0)
        self._session = session
        self._pto_streak = 0

    def _peer_restarted(self, now: float) -> None:
        for stream_id in list(self._streams):
            self._owner.emit(
                StreamReset(self.peer, stream_id, ERROR_PEER_RESTARTED, "peer restarted")
            )
        self._reset_connection()

    def sessions(self) -> list[Session]:
        return [s for s in (self._session, self._next_session, self._previous) if s is not None]

    def session_for(self, index: int) -> Session | None:
        """The session our `index` names (runs once per received packet)."""
        for session in (self._session, self._next_session, self._previous):
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
        if session is self._next_session:  # the initiator has the keys: confirmed
            self._next_session = None
            restarted, self._next_session_restarted = self._next_session_restarted, False
            self._activate(session, now, restarted=restarted)
        try:
            frames = parse_frames(plaintext)
        except FrameError:
            self._owner.count_drop("malformed")
            return
        self.stats_packets_received += 1
        self.stats_bytes_received += len(datagram)
        self._last_received = now
        self._pto_streak = 0
        if addr != self.remote_addr:
            self._on_new_path(addr, counter)
        ack_eliciting = False
        try:
            for frame in frames:
                if is_ack_eliciting(frame):
                    ack_eliciting = True
                self._handle_frame(frame, addr, now)
        except RemoteProtocolError as exc:  # flow control, frames, impossible ACKs
            self._protocol_error(now, str(exc))
            return
        self._record_received(counter, ack_eliciting, now)

    def _record_received(self, pn: int, ack_eliciting: bool, now: float) -> None:
        self._received.add(pn, pn + 1)
        while len(self._received) > _MAX_ACK_RANGES:
            self._received.pop_first()
        if pn > self._largest_received:
            self._largest_received = pn
            self._largest_received_time = now
        if ack_eliciting:
            self._ack_eliciting_unacked += 1
            if self._ack_eliciting_unacked >= _ACK_EVERY:
                self._ack_deadline = now
            elif self._ack_deadline is None:
                self._ack_deadline = now + self._config.max_ack_delay

    def _handle_frame(self, frame: Frame, addr: tuple[str, int], now: float) -> None:
        if isinstance(frame, Stream):
            self._on_stream_frame(frame, now)
        elif isinstance(frame, Ack):
            self._on_ack(frame, now)
        elif isinstance(frame, (Ping, Padding, DataBlocked, StreamDataBlocked)):
            pass
        elif isinstance(frame, MaxData):
            if self._conn_credit.update(frame.maximum):
                self._requeue_all()
        elif isinstance(frame, MaxStreamData):
            stream = self._streams.get(frame.stream_id)
            if stream is not None and stream.credit.update(frame.maximum):
                self._queue(stream)
        elif isinstance(frame, MaxStreams):
            self._peer_max_streams = max(self._peer_max_streams, frame.maximum)
        elif isinstance(frame, ResetStream):
            self._on_reset_stream(frame)
        elif isinstance(frame, StopSending):
            self._on_stop_sending(frame)
        elif isinstance(frame, PathChallenge):
            self._responses.append((frame.data, addr))
        elif isinstance(frame, PathResponse):
            self._on_path_response(frame, addr)
        elif isinstance(frame, Close):
            self._finish(now, frame.error_code, frame.reason or "closed by peer", by_peer=True)

    def _peer_stream(self, stream_id: int) -> _Stream | None:
        """The stream a peer frame names, created on first sight; None if long gone."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream
        if is_local_stream(stream_id, self._parity) or stream_id <= self._peer_streams_seen:
            return None  # a stream we finished with: late frames are harmless
        opened = (stream_id - (1 - self._parity)) // 2 + 1
        if opened > self._max_streams_sent:
            raise FrameError(
                f"peer opened stream {stream_id} beyond the limit of {self._max_streams_sent}"
            )
        for sid in range(self._peer_streams_seen + 1, stream_id + 1):
            if not is_local_stream(sid, self._parity):
                self._streams[sid] = self._new_stream(sid, None, local=False)
        self._peer_streams_seen = stream_id
        return self._streams[stream_id]

    def _frame_stream(self, stream_id: int) -> _Stream | None:
        """The stream a frame from the peer names (opening peer streams on first sight)."""
        if is_local_stream(stream_id, self._parity):
            return self._streams.get(stream_id)
        return self._peer_stream(stream_id)

    def _count_received(self, new_bytes: int) -> None:
        """Charge bytes beyond a stream's previous highest offset to the tunnel window."""
        if new_bytes > 0:
            self._conn_received += new_bytes
            self._conn_window.on_received(self._conn_received)

    def _on_stream_frame(self, frame: Stream, now: float) -> None:
        stream = self._frame_stream(frame.stream_id)
        if stream is None:
            return
        if not stream.local and frame.port is not None and stream.port is None:
            stream.port = frame.port
        if stream.recv_closed and stream.stop_code is None and stream.recv.eof:
            return
        stream.window.on_received(frame.offset + len(frame.data))
        self._count_received(stream.recv.add(frame.offset, frame.data, frame.fin))
        if not stream.local and not stream.announced and stream.port is not None:
            stream.announced = True
            if self._owner.is_listening(stream.port):
                self._owner.emit(StreamOpened(self.peer, stream.stream_id, stream.port))
            else:
                self._refuse(stream)
                return
        if stream.announced or stream.local:
            if stream.recv_closed:
                stream.recv.read()  # stop-sending: discard what still arrives
                self._maybe_forget(stream)
            elif stream.recv.readable or stream.recv.eof:
                self._owner.emit(StreamReadable(self.peer, stream.stream_id))

    def _refuse(self, stream: _Stream) -> None:
        stream.send.reset()
        stream.send_closed = True
        stream.reset_code = ERROR_PORT_UNREACHABLE
        stream.recv_closed = True
        stream.stop_code = ERROR_PORT_UNREACHABLE
        self._queue(stream)

    def _on_reset_stream(self, frame: ResetStream) -> None:
        stream = self._frame_stream(frame.stream_id)
        if stream is None:
            return
        before = stream.recv.highest_received
        stream.window.on_received(frame.final_size)
        stream.recv.reset(frame.final_size)
        self._count_received(stream.recv.highest_received - before)
        already = stream.recv_closed
        stream.recv_closed = True
        if not already and (stream.announced or stream.local):
            reason = "port unreachable" if frame.error_code == ERROR_PORT_UNREACHABLE else ""
            self._owner.emit(StreamReset(self.peer, stream.stream_id, frame.error_code, reason))
        if not stream.local and not stream.announced:
            stream.announced = True  # never surfaced; just let it go
            stream.send_closed = True
        self._maybe_forget(stream)

    def _on_stop_sending(self, frame: StopSending) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None or stream.send_closed:
            return
        stream.send.reset()
        stream.send_closed = True
        stream.reset_code = frame.error_code
        self._queue(stream)
        self._owner.emit(StreamStopSending(self.peer, stream.stream_id, frame.error_code))

    # -- acknowledgements and loss ----------------------------------------------------

    def _on_ack(self, frame: Ack, now: float) -> None:
        result = self._recovery.on_ack_received(frame.ranges, frame.ack_delay / 1e6, now)
        for packet in result.acked:
            for f in packet.frames:
                if type(f) is _StreamRef:
                    stream = self._streams.get(f.stream_id)
                    if stream is not None:
                        stream.send.on_acked(f.offset, f.length, f.fin)
                        self._after_send_progress(stream)
                elif isinstance(f, ResetStream):
                    stream = self._streams.get(f.stream_id)
                    if stream is not None:
                        stream.reset_unacked = False
                        self._maybe_forget(stream)
        self._on_lost(result.lost)
        if result.acked:
            self._pto_streak = 0

    def _after_send_progress(self, stream: _Stream) -> None:
        if (
            stream.writable_wanted
            and stream.send.buffered < self._config.send_buffer_limit // 2
            and not stream.send_closed
        ):
            stream.writable_wanted = False
            self._owner.emit(StreamWritable(self.peer, stream.stream_id))
        self._maybe_forget(stream)

    def _on_lost(self, packets: list[SentPacket]) -> None:
        for packet in packets:
            self.stats_lost_packets += 1
            for f in packet.frames:
                self.stats_retransmitted_frames += 1
                if type(f) is _StreamRef:
                    stream = self._streams.get(f.stream_id)
                    if stream is not None and not stream.send_closed:
                        stream.send.on_lost(f.offset, f.length, f.fin)
                        self._queue(stream)
                elif isinstance(f, ResetStream):
                    stream = self._streams.get(f.stream_id)
                    if stream is not None:
                        stream.reset_code = f.error_code
                        self._queue(stream)
                elif isinstance(f, StopSending):
                    stream = self._streams.get(f.stream_id)
                    if stream is not None and not stream.recv.eof:
                        stream.stop_code = f.error_code
                        self._queue(stream)
                elif isinstance(f, MaxData):
                    self._max_data_update = True
                elif isinstance(f, MaxStreamData):
                    stream = self._streams.get(f.stream_id)
                    if stream is not None:
                        stream.window_update = True
                        self._queue(stream)
                elif isinstance(f, MaxStreams):
                    self._control.append(MaxStreams(self._max_streams_sent))
                elif isinstance(f, Ping) and self.state != TunnelState.CLOSED:
                    self._queue_ping()  # confirmation and keepalive must get through

    # -- stream bookkeeping -------------------------------------------------------------

    def _new_stream(self, stream_id: int, port: int | None, *, local: bool) -> _Stream:
        cfg = self._config
        return _Stream(
            stream_id=stream_id,
            port=port,
            send=SendBuffer(),
            recv=RecvBuffer(),
            credit=SendCredit(self._peer_stream_credit),
            window=FlowWindow(cfg.initial_max_stream_data, maximum=cfg.max_stream_data_window),
            local=local,
        )

    def _stream(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} does not exist (closed or never opened)")
        return stream

    def _queue(self, stream: _Stream) -> None:
        if not stream.queued:
            stream.queued = True
            self._send_queue.append(stream.stream_id)

    def _requeue_all(self) -> None:
        for stream in self._streams.values():
            if stream.send.has_pending:
                self._queue(stream)

    def _maybe_forget(self, stream: _Stream) -> None:
        send_done = (
            stream.send_closed and stream.reset_code is None and not stream.reset_unacked
        ) or (not stream.send_closed and stream.send.all_acked)
        recv_done = stream.recv_closed and stream.stop_code is None
        if not (send_done and recv_done):
            return
        if self._streams.pop(stream.stream_id, None) is not None and not stream.local:
            self._peer_streams_closed += 1
            # Replenish the peer's stream budget once half of it is spent.
            if self._peer_streams_closed + self._config.max_streams // 2 >= (
                self._max_streams_sent
            ):
                self._max_streams_sent = self._peer_streams_closed + self._config.max_streams
                self._control.append(MaxStreams(self._max_streams_sent))

    # -- paths ---------------------------------------------------------------------------

    def _on_new_path(self, addr: tuple[str, int], counter: int) -> None:
        if self._challenge is not None and self._challenge[1] == addr:
            return
        token = os.urandom(8)
        self._challenge = (token, addr)
        self._directed.append((PathChallenge(token), addr))

    def _on_path_response(self, frame: PathResponse, addr: tuple[str, int]) -> None:
        if self._challenge is None or frame.data != self._challenge[0]:
            return
        old = self.remote_addr
        self.remote_addr = self._challenge[1]
        self._challenge = None
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
        for stream_id in list(self._streams):
            self._owner.emit(StreamReset(self.peer, stream_id, ERROR_TUNNEL_CLOSED, reason))
        self._streams.clear()
        self._send_queue.clear()
        self._recovery.discard_all()
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
        if not (self._streams or self._config.persistent_keepalive):
            return None
        return max(self._last_sent, self._last_received) + ka

    def get_timer(self) -> float | None:
        """The earliest time `handle_timer` must run, or None."""
        if self.state == TunnelState.CLOSED:
            assert self._closed_at is not None
            return self._closed_at + 3 * max(self._recovery.pto_interval(), 0.1)
        candidates: list[float] = []
        if self._handshake_started is not None:
            candidates.append(self._handshake_started + self._config.handshake_timeout)
            if self._handshake_retry_at is not None:
                candidates.append(self._handshake_retry_at)
        if self.state == TunnelState.ESTABLISHED:
            candidates.append(self._last_received + self._config.idle_timeout)
            loss = self._recovery.get_loss_detection_timer()
            if loss is not None:
                candidates.append(loss)
            if self._ack_deadline is not None:
                candidates.append(self._ack_deadline)
            if self._send_queue or self._control:
                pace = self._pacer.next_send_time(self._last_sent, self._config.max_datagram_size)
                if pace is not None and self._congestion.can_send(self._config.max_datagram_size):
                    candidates.append(pace)
            keepalive = self._keepalive_due()
            if keepalive is not None:
                candidates.append(keepalive)
        if self._previous is not None:
            candidates.append(self._previous_until)
        return min(candidates) if candidates else None

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
        if self.state != TunnelState.ESTABLISHED:
            return
        if now >= self._last_received + cfg.idle_timeout:
            self._finish(now, ERROR_IDLE_TIMEOUT, "idle timeout", by_peer=False)
            return
        loss = self._recovery.get_loss_detection_timer()
        if loss is not None and now >= loss:
            result = self._recovery.on_loss_detection_timeout(now)
            self._on_lost(result.lost)
            self._probes += result.probes
            self._queue_ping()
            if result.probes:
                self._pto_streak += 1
                if self._pto_streak >= _PTO_REHANDSHAKE and not self._pending:
                    # Silence after repeated probes: the peer may have restarted and
                    # forgotten our session. A fresh handshake finds out.
                    self._pto_streak = 0
                    self._start_handshake(now)
        keepalive = self._keepalive_due()
        if keepalive is not None and now >= keepalive:
            self._queue_ping()

    def _queue_ping(self) -> None:
        if not any(isinstance(f, Ping) for f in self._control):
            self._control.append(Ping())

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
            self._recovery.pto_interval(), 0.1
        )

    def statistics(self) -> TunnelStatistics:
        from ._stats import TunnelStatistics

        rtt = self._recovery.rtt
        return TunnelStatistics(
            peer=self.peer,
            peer_address=self.peer_address,
            remote_addr=self.remote_addr,
            state=self.state,
            smoothed_rtt=rtt.smoothed_rtt,
            min_rtt=rtt.min_rtt,
            latest_rtt=rtt.latest_rtt,
            rttvar=rtt.rttvar,
            congestion_window=self._congestion.congestion_window,
            bytes_in_flight=self._congestion.bytes_in_flight,
            packets_sent=self.stats_packets_sent,
            packets_received=self.stats_packets_received,
            bytes_sent=self.stats_bytes_sent,
            bytes_received=self.stats_bytes_received,
            packets_lost=self.stats_lost_packets,
            frames_retransmitted=self.stats_retransmitted_frames,
            streams=len(self._streams),
            handshakes=self.stats_handshakes,
            rekeys=self.stats_rekeys,
            path_changes=self.stats_path_changes,
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
            and (self._send_queue or self._control)
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
        for data, addr in self._responses:
            out.append((self._send_packet(session, [PathResponse(data)], now), addr))
        self._responses.clear()
        for frame, addr in self._directed:
            out.append((self._send_packet(session, [frame], now), addr))
        self._directed.clear()
        while True:
            frames, eliciting = self._fill(budget, now)
            if not frames:
                break
            out.append((self._send_packet(session, frames, now, eliciting), self.remote_addr))
            if not eliciting:
                break
        return out

    def _send_packet(
        self, session: Session, frames: list[Frame], now: float, eliciting: bool | None = None
    ) -> bytes:
        pn = self._next_pn
        datagram = self._seal_frames(session, frames)
        if eliciting is None:
            eliciting = any(is_ack_eliciting(f) for f in frames)
        self._recovery.on_packet_sent(
            SentPacket(
                packet_number=pn,
                time_sent=now,
                size=len(datagram),
                ack_eliciting=eliciting,
                in_flight=eliciting,
                frames=[_ref(f) for f in frames if not isinstance(f, (Ack, Padding))],
            )
        )
        self.stats_packets_sent += 1
        self.stats_bytes_sent += len(datagram)
        self._last_sent = now
        return datagram

    def _ack_frame(self, now: float) -> Ack | None:
        if not len(self._received):
            return None
        ranges = tuple((lo, hi - 1) for lo, hi in reversed(self._received.ranges()))
        delay = int(max(now - self._largest_received_time, 0.0) * 1e6)
        return Ack(ranges=ranges, ack_delay=delay)

    def _fill(self, budget: int, now: float) -> tuple[list[Frame], bool]:
        """Frames for one packet; (frames, ack_eliciting)."""
        frames: list[Frame] = []
        room = budget
        if self._ack_deadline is not None and self._ack_deadline <= now:
            ack = self._ack_frame(now)
            if ack is not None:
                frames.append(ack)
                room -= encoded_size(ack)
            self._ack_deadline = None
            self._ack_eliciting_unacked = 0
        size = self._config.max_datagram_size
        if self._probes:
            self._probes -= 1  # a probe goes out whatever the window says
        elif not self._congestion.can_send(size) or (
            self._pacer.next_send_time(now, size) is not None
        ):
            return self._ack_only(frames)
        eliciting = False
        if self._max_data_update:
            self._max_data_update = False
            self._control.append(MaxData(self._conn_window.limit))
        while self._control and room > 64:
            f = self._control.pop(0)
            frames.append(f)
            room -= encoded_size(f)
            eliciting = True
        rounds = len(self._send_queue)
        while self._send_queue and room > 32 and rounds > 0:
            rounds -= 1
            stream_id = self._send_queue[0]
            stream = self._streams.get(stream_id)
            if stream is None:
                self._send_queue.popleft()
                continue
            room, more = self._stream_frames(stream, frames, room)
            if frames and is_ack_eliciting(frames[-1]):
                eliciting = True
            if more and room <= 32:
                break  # packet full; this stream keeps its place
            self._send_queue.popleft()
            if more:
                self._send_queue.append(stream_id)
            else:
                stream.queued = False
        if eliciting and frames and not isinstance(frames[0], Ack):
            # Piggyback any acknowledgement we owe.
            ack = self._ack_frame(now) if self._ack_eliciting_unacked else None
            if ack is not None and encoded_size(ack) <= room:
                frames.insert(0, ack)
                self._ack_deadline = None
                self._ack_eliciting_unacked = 0
        if eliciting:
            return frames, True
        return self._ack_only(frames)

    def _ack_only(self, frames: list[Frame]) -> tuple[list[Frame], bool]:
        """Finish a packet that holds no ack-eliciting frame (or nothing at all).

        Every 16th such packet gets a PING, so the peer acknowledges our ACKs and
        neither side keeps records of ACK-only packets forever.
        """
        if not frames:
            return frames, False
        self._ack_only_sent += 1
        if self._ack_only_sent % 16 == 0:
            frames.append(Ping())
            return frames, True
        return frames, False

    def _stream_frames(self, stream: _Stream, frames: list[Frame], room: int) -> tuple[int, bool]:
        """Append this stream's control and data frames; (room left, more pending)."""
        sid = stream.stream_id
        control: list[Frame] = []
        if stream.reset_code is not None:
            control.append(ResetStream(sid, stream.reset_code, stream.send.highest_sent))
            stream.reset_code = None
            stream.reset_unacked = True
        if stream.stop_code is not None:
            control.append(StopSending(sid, stream.stop_code))
            stream.stop_code = None
        if stream.window_update:
            stream.window_update = False
            control.append(MaxStreamData(sid, stream.window.limit))
        for frame in control:
            frames.append(frame)
            room -= encoded_size(frame)
        if stream.send_closed:
            return room, False
        send = stream.send
        while room > 32:
            highest = send.highest_sent
            # Worst case header: a large offset and, at offset 0, the port.
            max_data = room - stream_frame_overhead(sid, highest + (1 << 30), room, None) - 4
            if max_data < 0:
                break
            limit = min(stream.credit.limit, highest + self._conn_credit.available(self._conn_sent))
            chunk = send.next_frame(max_data, limit)
            if chunk is None:
                return room, False
            offset, data, fin = chunk
            self._conn_sent += max(0, offset + len(data) - highest)
            frame = Stream(sid, offset, data, fin, stream.port if offset == 0 else None)
            frames.append(frame)
            room -= encoded_size(frame)
        return room, True


@dataclass(frozen=True, slots=True)
class _StreamRef:
    """What recovery remembers of a sent STREAM frame: where, not the bytes."""

    stream_id: int
    offset: int
    length: int
    fin: bool


def _ref(frame: Frame) -> object:
    if isinstance(frame, Stream):
        return _StreamRef(frame.stream_id, frame.offset, len(frame.data), frame.fin)
    return frame
