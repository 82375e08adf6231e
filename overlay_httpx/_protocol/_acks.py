"""What a connection owes its peer in acknowledgements (RFC 9000 §13.2), sans-IO.

`AckState` remembers the packet numbers received (the most recent
`MAX_ACK_RANGES` ranges), decides when an ACK is due (at once after every
second ack-eliciting packet, else within `max_ack_delay`), builds the ACK
frame, and keeps ACK-only traffic from going unacknowledged forever.
"""

from __future__ import annotations

from typing import Final

from ._frames import Ack, Frame, Ping
from ._streams import _RangeSet

__all__ = ["ACK_EVERY", "MAX_ACK_RANGES", "AckState"]

MAX_ACK_RANGES: Final = 32
"""Ranges kept (and reported); older ones are forgotten, never wrongly acknowledged."""

ACK_EVERY: Final = 2
"""Ack-eliciting packets received before an ACK goes out without delay."""

_PING_EVERY_ACK_ONLY: Final = 16


class AckState:
    """Received packet numbers and the acknowledgement owed for them."""

    __slots__ = (
        "_ack_only_sent",
        "_largest",
        "_largest_time",
        "_max_ack_delay",
        "_received",
        "_unacked_eliciting",
        "deadline",
    )

    def __init__(self, max_ack_delay: float) -> None:
        self._max_ack_delay = max_ack_delay
        self._received = _RangeSet()
        self._largest = -1
        self._largest_time = 0.0
        self._unacked_eliciting = 0
        self._ack_only_sent = 0
        self.deadline: float | None = None
        """When an ACK must leave at the latest; None when none is owed."""

    def on_packet(self, pn: int, ack_eliciting: bool, now: float) -> None:
        """Remember packet `pn` and schedule the ACK it calls for."""
        self._received.add(pn, pn + 1)
        while len(self._received) > MAX_ACK_RANGES:
            self._received.pop_first()
        if pn > self._largest:
            self._largest = pn
            self._largest_time = now
        if ack_eliciting:
            self._unacked_eliciting += 1
            if self._unacked_eliciting >= ACK_EVERY:
                self.deadline = now
            elif self.deadline is None:
                self.deadline = now + self._max_ack_delay

    def due(self, now: float) -> bool:
        return self.deadline is not None and self.deadline <= now

    @property
    def owed(self) -> bool:
        """Ack-eliciting packets arrived since the last ACK (worth piggybacking one)."""
        return self._unacked_eliciting > 0

    def frame(self, now: float) -> Ack | None:
        """The ACK frame for everything remembered, or None before any packet."""
        received = self._received
        if not len(received):
            return None
        delay = now - self._largest_time
        return Ack(received.inclusive_descending(), int(delay * 1e6) if delay > 0.0 else 0)

    def sent(self) -> None:
        """An ACK left: nothing is owed until the next ack-eliciting packet."""
        self.deadline = None
        self._unacked_eliciting = 0

    def finish_ack_only(self, frames: list[Frame]) -> tuple[list[Frame], bool]:
        """Finish a packet that holds no ack-eliciting frame (or nothing at all).

        Every 16th such packet gets a PING, so the peer acknowledges our ACKs and
        neither side keeps records of ACK-only packets forever.
        """
        if not frames:
            return frames, False
        self._ack_only_sent += 1
        if self._ack_only_sent % _PING_EVERY_ACK_ONLY == 0:
            frames.append(Ping())
            return frames, True
        return frames, False
