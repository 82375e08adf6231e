"""The connection inside a tunnel: streams, acknowledgements, loss recovery, flow control.

A `Tunnel` owns one `Connection`. It hands the connection every received
frame that is not about paths or closing, and asks it for the frames of each
packet it sends. When the peer restarts, the tunnel replaces its connection
with a new one, so nothing of the old state (stream ids, windows, packet
records) survives into the new one. Packet numbers belong to the tunnel: they
outlive connections so that nonces stay unique.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from .._exceptions import FrameError, LocalProtocolError
from ._acks import AckState
from ._config import TunnelConfig
from ._congestion import CongestionController, Pacer, make_congestion_controller
from ._connection_streams import StreamRef, StreamState, ref
from ._events import (
    ERROR_PORT_UNREACHABLE,
    Event,
    StreamOpened,
    StreamReadable,
    StreamReset,
    StreamStopSending,
    StreamWritable,
)
from ._frames import (
    Ack,
    DataBlocked,
    Frame,
    MaxData,
    MaxStreamData,
    MaxStreams,
    Padding,
    Ping,
    ResetStream,
    StopSending,
    Stream,
    StreamDataBlocked,
    encoded_size,
    is_ack_eliciting,
    stream_frame_overhead,
)
from ._packet import TransportParameters
from ._recovery import LossRecovery, RttEstimator, SentPacket
from ._streams import FlowWindow, SendCredit, is_local_stream

__all__ = ["Connection", "ConnectionOwner"]


class ConnectionOwner(Protocol):
    """What a connection needs from its endpoint (implemented by `Endpoint`)."""

    config: TunnelConfig

    def is_listening(self, port: int) -> bool: ...
    def emit(self, event: Event) -> None: ...


class Connection:
    """The reliable, flow-controlled streams of one tunnel, for one life of the peer."""

    def __init__(self, owner: ConnectionOwner, peer: bytes, parity: int) -> None:
        cfg = owner.config
        self._congestion = make_congestion_controller(
            cfg.congestion_control, max_datagram_size=cfg.max_datagram_size
        )
        self._pacer = Pacer(max_datagram_size=cfg.max_datagram_size)
        self._recovery = LossRecovery(
            congestion=self._congestion,
            max_ack_delay=cfg.max_ack_delay,
            initial_rtt=cfg.initial_rtt,
            pacer=self._pacer,
        )
        self._owner = owner
        self._config = cfg
        self._peer = peer
        self._parity = parity
        self._closed = False
        self._streams: dict[int, StreamState] = {}
        self._send_queue: deque[int] = deque()
        self._control: list[Frame] = []
        self._next_local_stream = parity
        self._peer_streams_seen = -1  # highest peer stream id seen
        self._peer_streams_closed = 0
        self._peer_max_streams = cfg.max_streams  # until their hello says otherwise
        self._peer_params_seen = False
        self._local_streams_opened = 0
        self._max_streams_sent = cfg.max_streams
        self._acks = AckState(cfg.max_ack_delay)
        self._conn_credit = SendCredit(cfg.initial_max_data)
        self._conn_sent = 0
        self._conn_window = FlowWindow(cfg.initial_max_data, maximum=cfg.max_data_window)
        self._conn_received = 0
        self._conn_consumed = 0
        self._max_data_update = False
        self._peer_stream_credit = cfg.initial_max_stream_data
        self.pto_streak = 0  # probe timeouts in a row without hearing from the peer
        self._probes = 0  # probe packets owed: they go out even with a full window
        self.stats_bytes_sent = 0
        self.stats_bytes_received = 0
        self.stats_packets_sent = 0
        self.stats_packets_received = 0
        self.stats_retransmitted_frames = 0
        self.stats_lost_packets = 0

    # -- views ---------------------------------------------------------------------

    @property
    def rtt(self) -> RttEstimator:
        return self._recovery.rtt

    @property
    def congestion(self) -> CongestionController:
        return self._congestion

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def wants_to_send(self) -> bool:
        """Streams or control frames are waiting for room in a packet."""
        return bool(self._send_queue or self._control or self._max_data_update)

    def pto_interval(self) -> float:
        return self._recovery.pto_interval()

    def on_peer_params(self, params: TransportParameters) -> None:
        """Adopt the limits a handshake's hello announces.

        A rekey's hello repeats the initial stream limit; MAX_STREAMS may have
        raised it since, and a limit never goes down within one connection.
        """
        if self._peer_params_seen:
            self._peer_max_streams = max(self._peer_max_streams, params.max_streams)
        else:
            self._peer_max_streams = params.max_streams
            self._peer_params_seen = True
        if self._local_streams_opened == 0 and not self._streams:
            self._conn_credit = SendCredit(params.initial_max_data)
        self._peer_stream_credit = params.initial_max_stream_data
        for stream in self._streams.values():
            if stream.local and stream.send.highest_sent == 0:
                stream.credit.update(params.initial_max_stream_data)
        self._conn_credit.update(params.initial_max_data)

    # -- stream API (the tunnel's public calls land here) ---------------------------

    def open_stream(self, port: int) -> int:
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
        return stream_id

    def send_stream(self, stream_id: int, data: bytes, *, end_stream: bool) -> None:
        stream = self._stream(stream_id)
        if stream.send_closed:
            raise LocalProtocolError(f"stream {stream_id} was reset; it cannot send")
        if data:
            stream.send.write(data)
        if end_stream:
            stream.send.finish()
        self._queue(stream)

    def send_buffer_available(self, stream_id: int) -> int:
        stream = self._stream(stream_id)
        free = self._config.send_buffer_limit - stream.send.buffered
        if free <= 0:
            stream.writable_wanted = True  # StreamWritable once it drains
        return max(free, 0)

    def read_stream(self, stream_id: int, max_bytes: int, now: float) -> bytes:
        """Read, and grow the flow-control windows the application has consumed."""
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

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.send_closed:
            return
        stream.reset_send(error_code)
        self._queue(stream)

    def stop_sending(self, stream_id: int, error_code: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.recv_closed:
            return
        stream.recv_closed = True
        stream.stop_code = error_code
        self._queue(stream)

    def stream_ids(self) -> list[int]:
        return list(self._streams)

    @property
    def delivering(self) -> bool:
        """Some stream still has bytes or a FIN the peer has not acknowledged."""
        return any(s.send.delivering for s in self._streams.values())

    def take_unstarted(self) -> list[tuple[int, int, bytes, bool]]:
        """Remove and return our streams the peer never acknowledged or answered.

        Each is ``(stream_id, port, every byte written, fin)``: after a peer
        restart these are replayed on the new connection (`adopt`).
        """
        taken = []
        for sid, stream in list(self._streams.items()):
            if (
                not stream.local
                or stream.port is None
                or stream.send_closed
                or stream.recv_closed
                or stream.recv.highest_received
            ):
                continue
            replay = stream.send.replayable()
            if replay is not None:
                del self._streams[sid]
                taken.append((sid, stream.port, *replay))
        return taken

    def adopt(self, streams: list[tuple[int, int, bytes, bool]]) -> list[tuple[int, int]]:
        """Open `streams` (from `take_unstarted`) here; returns ``(old id, new id)`` pairs."""
        moved = []
        for old_id, port, data, fin in streams:
            new_id = self.open_stream(port)
            self.send_stream(new_id, data, end_stream=fin)
            moved.append((old_id, new_id))
        return moved

    def close(self, error_code: int, reason: str) -> None:
        """End every stream (`StreamReset` with `error_code`) and forget what is in flight."""
        self._closed = True
        for stream_id, stream in list(self._streams.items()):
            self._owner.emit(
                StreamReset(self._peer, stream_id, error_code, reason, stream.send.delivered)
            )
        self._streams.clear()
        self._send_queue.clear()
        self._recovery.discard_all()

    # -- receiving -----------------------------------------------------------------

    def on_packet_received(self, size: int) -> None:
        """An authenticated packet of `size` bytes arrived: the peer is alive."""
        self.stats_packets_received += 1
        self.stats_bytes_received += size
        self.pto_streak = 0

    def record_received(self, pn: int, ack_eliciting: bool, now: float) -> None:
        """Remember packet `pn` for our ACKs, and schedule the next ACK."""
        self._acks.on_packet(pn, ack_eliciting, now)

    def handle_frame(self, frame: Frame, now: float) -> None:
        """Act on a stream, flow-control or ACK frame (path and CLOSE frames are the tunnel's)."""
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

    def _peer_stream(self, stream_id: int) -> StreamState | None:
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

    def _frame_stream(self, stream_id: int) -> StreamState | None:
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
                self._owner.emit(StreamOpened(self._peer, stream.stream_id, stream.port))
                if stream.unannounced_stop is not None:
                    self._owner.emit(
                        StreamStopSending(self._peer, stream.stream_id, stream.unannounced_stop)
                    )
            else:
                self._refuse(stream)
                return
        if stream.announced or stream.local:
            if stream.recv_closed:
                stream.recv.read()  # stop-sending: discard what still arrives
                self._maybe_forget(stream)
            elif stream.recv.readable or stream.recv.eof:
                self._owner.emit(StreamReadable(self._peer, stream.stream_id))

    def _refuse(self, stream: StreamState) -> None:
        stream.reset_send(ERROR_PORT_UNREACHABLE)
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
            self._owner.emit(StreamReset(self._peer, stream.stream_id, frame.error_code, reason))
        if not stream.local and not stream.announced:
            stream.announced = True  # never surfaced; just let it go
            stream.send_closed = True
        self._maybe_forget(stream)

    def _on_stop_sending(self, frame: StopSending) -> None:
        # It may come before the STREAM frame that opens the stream (same packet,
        # control frames first), so it opens peer streams like any stream frame.
        stream = self._frame_stream(frame.stream_id)
        if stream is None or stream.send_closed:
            return
        stream.reset_send(frame.error_code)
        self._queue(stream)
        if stream.local or stream.announced:
            self._owner.emit(StreamStopSending(self._peer, stream.stream_id, frame.error_code))
        else:
            stream.unannounced_stop = frame.error_code  # said right after StreamOpened

    # -- acknowledgements and loss ----------------------------------------------------

    def _on_ack(self, frame: Ack, now: float) -> None:
        result = self._recovery.on_ack_received(frame.ranges, frame.ack_delay / 1e6, now)
        for packet in result.acked:
            for f in packet.frames:
                if type(f) is StreamRef:
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
            self.pto_streak = 0

    def _after_send_progress(self, stream: StreamState) -> None:
        if (
            stream.writable_wanted
            and stream.send.buffered < self._config.send_buffer_limit // 2
            and not stream.send_closed
        ):
            stream.writable_wanted = False
            self._owner.emit(StreamWritable(self._peer, stream.stream_id))
        self._maybe_forget(stream)

    def _on_lost(self, packets: list[SentPacket]) -> None:
        for packet in packets:
            self.stats_lost_packets += 1
            for f in packet.frames:
                self.stats_retransmitted_frames += 1
                if isinstance(f, (StreamRef, ResetStream, StopSending, MaxStreamData)):
                    stream = self._streams.get(f.stream_id)
                    if stream is not None and stream.on_frame_lost(f):
                        self._queue(stream)
                elif isinstance(f, MaxData):
                    self._max_data_update = True
                elif isinstance(f, MaxStreams):
                    self._control.append(MaxStreams(self._max_streams_sent))
                elif isinstance(f, Ping) and not self._closed:
                    self.queue_ping()  # confirmation and keepalive must get through

    def handle_loss_timer(self, now: float) -> bool:
        """Run loss detection if its timer is due; True when it sent probes (a PTO)."""
        loss = self._recovery.get_loss_detection_timer()
        if loss is None or now < loss:
            return False
        result = self._recovery.on_loss_detection_timeout(now)
        self._on_lost(result.lost)
        self._probes += result.probes
        self.queue_ping()
        if result.probes:
            self.pto_streak += 1
        return bool(result.probes)

    def probe(self) -> None:
        """An ack-eliciting packet (a PING, and what else fits) goes out at the next send,
        even with a full congestion window."""
        self._probes += 1
        self.queue_ping()

    def queue_ping(self) -> None:
        if not any(isinstance(f, Ping) for f in self._control):
            self._control.append(Ping())

    # -- stream bookkeeping -------------------------------------------------------------

    def _new_stream(self, stream_id: int, port: int | None, *, local: bool) -> StreamState:
        return StreamState.new(
            stream_id, port, local=local, credit=self._peer_stream_credit, config=self._config
        )

    def _stream(self, stream_id: int) -> StreamState:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} does not exist (closed or never opened)")
        return stream

    def _queue(self, stream: StreamState) -> None:
        if not stream.queued:
            stream.queued = True
            self._send_queue.append(stream.stream_id)

    def _requeue_all(self) -> None:
        for stream in self._streams.values():
            if stream.send.has_pending:
                self._queue(stream)

    def _maybe_forget(self, stream: StreamState) -> None:
        if not stream.finished:
            return
        if self._streams.pop(stream.stream_id, None) is not None and not stream.local:
            self._peer_streams_closed += 1
            # Replenish the peer's stream budget once half of it is spent.
            if self._peer_streams_closed + self._config.max_streams // 2 >= (
                self._max_streams_sent
            ):
                self._max_streams_sent = self._peer_streams_closed + self._config.max_streams
                self._control.append(MaxStreams(self._max_streams_sent))

    # -- sending ---------------------------------------------------------------------------

    def next_deadline(self, last_sent: float) -> float | None:
        """When loss detection, a delayed ACK or the pacer next need the tunnel's timer.

        The earliest of the three, or None; runs after every flush, so it builds no list.
        """
        best = self._recovery.get_loss_detection_timer()
        ack = self._acks.deadline
        if ack is not None and (best is None or ack < best):
            best = ack
        if self._send_queue or self._control or self._max_data_update:
            size = self._config.max_datagram_size
            pace = self._pacer.next_send_time(last_sent, size)
            if (
                pace is not None
                and (best is None or pace < best)
                and self._congestion.can_send(size)
            ):
                best = pace
        return best

    def has_work(self, now: float) -> bool:
        """Whether `fill` would put anything in a packet (or try to, window permitting).

        False means nothing is queued, no probe is owed and no ACK is due yet:
        `fill` would return no frames, and the caller runs `on_nothing_to_send`
        instead, which is all `fill` would have done.
        """
        if self._send_queue or self._control or self._max_data_update or self._probes:
            return True
        deadline = self._acks.deadline
        return deadline is not None and deadline <= now

    def on_nothing_to_send(self, now: float) -> None:
        """What `fill` does when `has_work` is False: tell congestion control why we stopped.

        With room in the window (and no pacing delay) the application is what
        limits us (RFC 9002 §7.8), else the window is. BBR re-marks its
        app-limited bubble on every call, so this runs whenever `fill` would.
        """
        size = self._config.max_datagram_size
        if not self._congestion.can_send(size):
            self._congestion.set_app_limited(False)
        elif self._pacer.next_send_time(now, size) is None:
            self._congestion.set_app_limited(True)

    def on_packet_sent(
        self, pn: int, frames: list[Frame], size: int, now: float, eliciting: bool | None
    ) -> None:
        """Hand a sealed packet of `size` bytes to loss recovery and the counters."""
        if eliciting is None:
            eliciting = any(is_ack_eliciting(f) for f in frames)
        self._recovery.on_packet_sent(
            SentPacket(
                packet_number=pn,
                time_sent=now,
                size=size,
                ack_eliciting=eliciting,
                in_flight=eliciting,
                frames=[ref(f) for f in frames if not isinstance(f, (Ack, Padding))],
            )
        )
        self.stats_packets_sent += 1
        self.stats_bytes_sent += size

    def fill(self, budget: int, now: float) -> tuple[list[Frame], bool]:
        """Frames for one packet of at most `budget` bytes; (frames, ack_eliciting)."""
        frames: list[Frame] = []
        room = budget
        acks = self._acks
        if acks.due(now):
            ack = acks.frame(now)
            if ack is not None:
                frames.append(ack)
                room -= encoded_size(ack)
            acks.sent()
        size = self._config.max_datagram_size
        if self._probes:
            self._probes -= 1  # a probe goes out whatever the window says
        elif not self._congestion.can_send(size):
            self._congestion.set_app_limited(False)  # the window, not the application, stops us
            return acks.finish_ack_only(frames)
        elif self._pacer.next_send_time(now, size) is not None:
            return acks.finish_ack_only(frames)
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
        if not self._send_queue and not self._control:
            # Out of data with room in the window: acknowledgements of what we
            # send now say nothing about the path's capacity (RFC 9002 §7.8).
            self._congestion.set_app_limited(True)
        if eliciting and frames and not isinstance(frames[0], Ack):
            # Piggyback any acknowledgement we owe.
            ack = acks.frame(now) if acks.owed else None
            if ack is not None and encoded_size(ack) <= room:
                frames.insert(0, ack)
                acks.sent()
        if eliciting:
            return frames, True
        return acks.finish_ack_only(frames)

    def _stream_frames(
        self, stream: StreamState, frames: list[Frame], room: int
    ) -> tuple[int, bool]:
        """Append this stream's control and data frames; (room left, more pending)."""
        for frame in stream.control_frames():
            frames.append(frame)
            room -= encoded_size(frame)
        if stream.send_closed:
            return room, False
        sid = stream.stream_id
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
