"""Per-stream state of a connection, and what loss recovery remembers of stream data.

`StreamState` bundles one stream's buffers, flow-control windows and the
control frames it owes the peer; `Connection` keeps one per live stream and
drives them. The buffers and windows themselves live in `_streams`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._config import TunnelConfig
from ._fastinit import fast_frozen_init
from ._frames import Frame, MaxStreamData, ResetStream, StopSending, Stream
from ._streams import FlowWindow, RecvBuffer, SendBuffer, SendCredit

__all__ = ["StreamRef", "StreamState", "ref"]


@dataclass(slots=True)
class StreamState:
    """One stream of a connection: both directions and what we owe the peer about it."""

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
    unannounced_stop: int | None = None  # the peer's STOP_SENDING, before StreamOpened
    queued: bool = False
    writable_wanted: bool = False
    window_update: bool = False

    @classmethod
    def new(
        cls, stream_id: int, port: int | None, *, local: bool, credit: int, config: TunnelConfig
    ) -> StreamState:
        """A fresh stream; `credit` is the peer's initial per-stream send limit."""
        return cls(
            stream_id=stream_id,
            port=port,
            send=SendBuffer(),
            recv=RecvBuffer(),
            credit=SendCredit(credit),
            window=FlowWindow(
                config.initial_max_stream_data, maximum=config.max_stream_data_window
            ),
            local=local,
        )

    def reset_send(self, error_code: int) -> None:
        """Abandon our sending side; a RESET_STREAM with `error_code` is now owed."""
        self.send.reset()
        self.send_closed = True
        self.reset_code = error_code

    @property
    def finished(self) -> bool:
        """Both directions are done and nothing is owed: the stream can be forgotten.

        Our side is done when fully acknowledged, or reset with the reset
        acknowledged; the peer's side when read to the end, reset, or stopped
        with the STOP_SENDING sent.
        """
        send_done = (self.send_closed and self.reset_code is None and not self.reset_unacked) or (
            not self.send_closed and self.send.all_acked
        )
        return send_done and self.recv_closed and self.stop_code is None

    def on_frame_lost(self, frame: StreamRef | ResetStream | StopSending | MaxStreamData) -> bool:
        """Owe the peer again what a lost frame of this stream said; True if anything is owed.

        Stream data is re-sent by range unless we reset the stream since; a
        lost STOP_SENDING is moot once everything arrived anyway. Control
        frames are rebuilt with current values when next sent.
        """
        if isinstance(frame, StreamRef):
            if self.send_closed:
                return False
            self.send.on_lost(frame.offset, frame.length, frame.fin)
        elif isinstance(frame, ResetStream):
            self.reset_code = frame.error_code
        elif isinstance(frame, StopSending):
            if self.recv.eof:
                return False
            self.stop_code = frame.error_code
        else:
            self.window_update = True
        return True

    def control_frames(self) -> list[Frame]:
        """The RESET_STREAM, STOP_SENDING and MAX_STREAM_DATA owed now, marked as sent."""
        sid = self.stream_id
        control: list[Frame] = []
        if self.reset_code is not None:
            control.append(ResetStream(sid, self.reset_code, self.send.highest_sent))
            self.reset_code = None
            self.reset_unacked = True
        if self.stop_code is not None:
            control.append(StopSending(sid, self.stop_code))
            self.stop_code = None
        if self.window_update:
            self.window_update = False
            control.append(MaxStreamData(sid, self.window.limit))
        return control


@fast_frozen_init
@dataclass(frozen=True, slots=True)
class StreamRef:
    """What recovery remembers of a sent STREAM frame: where, not the bytes."""

    stream_id: int
    offset: int
    length: int
    fin: bool


def ref(frame: Frame) -> object:
    """What to remember of a sent frame until it is acknowledged or lost."""
    if isinstance(frame, Stream):
        return StreamRef(frame.stream_id, frame.offset, len(frame.data), frame.fin)
    return frame
