"""`Endpoint.receive_datagram` never raises, whatever arrives; every drop is counted."""

from __future__ import annotations

import pytest
from _fuzzing import fuzz_settings
from _harness import A_ADDR, B_ADDR, make_pair
from hypothesis import given
from hypothesis import strategies as st

from overlay_httpx import Address, Identity
from overlay_httpx._protocol._endpoint import Endpoint

_ENDPOINT = Endpoint(Identity.generate(), Address(1, 9))
_ENDPOINT.listen(80)


def _real_datagrams() -> tuple[Endpoint, list[bytes]]:
    net, a, b = make_pair()
    out: list[bytes] = []
    original = net._send

    def send(src, dst, data, now):  # type: ignore[no-untyped-def]
        if dst == B_ADDR and len(out) < 20:
            out.append(data)
        original(src, dst, data, now)

    net._send = send  # type: ignore[method-assign]
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    sid = tunnel.open_stream(80, net.now)
    a.write(tunnel, sid, b"x" * 5000, fin=True)
    net.run(until=lambda: a.state(tunnel, sid).eof, timeout=30)
    net.run_for(1.0)
    return b.endpoint, out


RECEIVER, SEEDS = _real_datagrams()

pytestmark = pytest.mark.fuzz


@fuzz_settings(300)
@given(st.binary(max_size=1500))
def test_random_datagrams(data: bytes) -> None:
    before = _ENDPOINT.statistics().dropped
    _ENDPOINT.receive_datagram(data, A_ADDR, 1.0)
    stats = _ENDPOINT.statistics()
    assert stats.dropped == before + 1
    assert "internal_error" not in stats.drops


@fuzz_settings(300)
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 1499), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 1500),
)
def test_mutated_real_datagrams(seed: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed[: max(cut, 1)])
    for pos, value in edits:
        data[pos % len(data)] = value
    # Fed to the endpoint that holds the live sessions: a changed datagram fails
    # authentication, an unchanged one is a replay; either way it is dropped.
    before = RECEIVER.statistics().dropped
    RECEIVER.receive_datagram(bytes(data), A_ADDR, 100.0)
    stats = RECEIVER.statistics()
    assert stats.dropped == before + 1
    assert "internal_error" not in stats.drops
