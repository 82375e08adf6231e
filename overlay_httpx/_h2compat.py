"""Work-arounds for costs and quirks of the h2 / hyperframe libraries, in one place.

* `use_local_settings`: h2 applies our MAX_FRAME_SIZE only once the peer
  acknowledges it, and checks every frame of a received chunk against the
  size in force when the chunk arrived, so a big DATA frame right behind that
  ACK would be refused. Accepting big frames before the ACK is harmless.
* `install` (run on import): h2 logs every received frame with
  ``repr(frame)``, computed eagerly even when logging is off, and hyperframe's
  repr of a DATA frame serialises the whole payload and hex-encodes it. On a
  64 MiB download that was a third of the client's CPU. DATA frames now get a
  repr that states their size; nothing else about the frames changes. It is
  idempotent and process-wide (hyperframe's classes are shared).
"""

from __future__ import annotations

from h2.connection import H2Connection
from h2.settings import Settings
from hyperframe.frame import DataFrame

__all__ = ["install", "use_local_settings"]


def use_local_settings(conn: H2Connection, settings: Settings, max_frame_size: int) -> None:
    """Announce `settings` (sent by ``initiate_connection``) and accept frames of
    up to `max_frame_size` at once, not only after the peer's ACK."""
    conn.local_settings = settings
    conn.max_inbound_frame_size = max_frame_size


def _data_frame_body_repr(self: DataFrame) -> str:
    return f"<{len(self.data)} bytes of data, {self.pad_length} of padding>"


def install() -> None:
    """Make DATA frame reprs O(1) (see the module docstring)."""
    DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]


install()
