"""The h2 work-arounds stay in force."""

from __future__ import annotations

from hyperframe.frame import DataFrame

import overlay_httpx._http._client  # noqa: F401  (installs the work-arounds)


def test_data_frame_repr_does_not_copy_the_payload() -> None:
    frame = DataFrame(1, b"x" * 1_000_000)
    text = repr(frame)
    assert "1000000 bytes of data" in text
    assert len(text) < 100
