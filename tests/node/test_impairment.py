"""Two nodes through a userspace impairment relay: loss, reordering, duplication, delay."""

from __future__ import annotations

import hashlib
import logging

import anyio
import pytest
from _nodes import payload, send_all_then_eof, sha_of_stream
from _relay import ImpairmentRelay

from overlay_httpx import Identity, Node

pytestmark = pytest.mark.anyio


async def test_16_mib_intact_through_a_lossy_reordering_duplicating_relay() -> None:
    size = 16 << 20
    data = payload(size, seed=5)
    async with (
        Node(Identity.generate()) as a,
        Node(Identity.generate()) as b,
        ImpairmentRelay(seed=5, loss=0.05, duplicate=0.02, reorder=0.05, delay=0.002) as relay,
    ):
        relay.wire(a, b)
        listener = await b.listen(9)
        stream = await a.connect(b.address, 9)
        async with anyio.create_task_group() as tg:
            tg.start_soon(send_all_then_eof, stream, data)
            incoming = await listener.accept()
            with anyio.fail_after(60):
                got = await sha_of_stream(incoming)
        assert got == (hashlib.sha256(data).hexdigest(), size)
        assert relay.stats.dropped > 0
        assert relay.stats.duplicated > 0
        assert relay.stats.reordered > 0
        (tunnel,) = a.statistics().tunnels
        assert tunnel.packets_lost > 0  # the loss was seen and repaired, not avoided


async def test_loss_episodes_are_logged_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    data = payload(1 << 20, seed=6)
    with caplog.at_level(logging.DEBUG, logger="overlay_httpx"):
        async with (
            Node(Identity.generate()) as a,
            Node(Identity.generate()) as b,
            ImpairmentRelay(seed=6, loss=0.1) as relay,
        ):
            relay.wire(a, b)
            listener = await b.listen(9)
            stream = await a.connect(b.address, 9)
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_all_then_eof, stream, data)
                incoming = await listener.accept()
                with anyio.fail_after(30):
                    got = await sha_of_stream(incoming)
    assert got == (hashlib.sha256(data).hexdigest(), len(data))
    assert any("packets lost" in r.getMessage() for r in caplog.records)
