"""Work-arounds for costs and quirks of the h2 / hyperframe libraries, in one place.

h2 logs every received frame with ``repr(frame)``, computed eagerly even when
logging is off, and hyperframe's repr of a DATA frame serialises the whole
payload and hex-encodes it. On a 64 MiB download that was a third of the
client's CPU. `install` gives DATA frames a repr that states their size
instead; nothing else about the frames changes. It is idempotent and
process-wide (hyperframe's classes are shared), and only affects reprs.
"""

from __future__ import annotations

from hyperframe.frame import DataFrame

__all__ = ["install"]


def _data_frame_body_repr(self: DataFrame) -> str:
    return f"<{len(self.data)} bytes of data, {self.pad_length} of padding>"


def install() -> None:
    """Make DATA frame reprs O(1) (see the module docstring)."""
    DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]


install()
