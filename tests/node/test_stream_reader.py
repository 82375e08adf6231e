"""Reading without a task: `receive_nowait`, and `set_reader`'s callback from the node."""

from __future__ import annotations

import anyio
import pytest
from _nodes import node_pair, payload

from overlay_httpx import OverlayStream, StreamReset

pytestmark = pytest.mark.anyio


async def test_receive_nowait_gives_what_has_arrived_then_the_end() -> None:
    async with node_pair() as (a, b):
        listener = await b.listen(7)
        stream = await a.connect(b.address, 7)
        await stream.send(b"first")
        incoming = await listener.accept()
        assert incoming.receive_nowait() == b"first"
        assert incoming.receive_nowait() == b""  # nothing more yet: no wait, no error
        news = anyio.Event()
        incoming.set_reader(news.set)
        await stream.send(b"second")
        with anyio.fail_after(5):
            await news.wait()
        assert incoming.receive_nowait() == b"second"
        news = anyio.Event()
        incoming.set_reader(news.set)
        await stream.send_eof()
        with anyio.fail_after(5):
            await news.wait()
        with pytest.raises(anyio.EndOfStream):
            incoming.receive_nowait()
        with pytest.raises(anyio.EndOfStream):
            incoming.receive_nowait()
        incoming.close()
        with pytest.raises(anyio.ClosedResourceError):
            incoming.receive_nowait()


async def test_the_reader_is_called_as_data_arrives_and_at_the_end() -> None:
    data = payload(600_000)  # many datagrams, several window updates
    async with node_pair() as (a, b):
        listener = await b.listen(7)
        stream = await a.connect(b.address, 7)
        await stream.send(b"x")
        incoming = await listener.accept()
        got = bytearray()
        calls = 0
        ended = anyio.Event()

        def on_readable() -> None:
            nonlocal calls
            calls += 1
            while not ended.is_set():
                try:
                    chunk = incoming.receive_nowait()
                except anyio.EndOfStream:
                    ended.set()
                    return
                if not chunk:
                    return
                got.extend(chunk)

        incoming.set_reader(on_readable)
        on_readable()  # the first byte came before the reader was set
        await stream.send(data)
        await stream.send_eof()
        with anyio.fail_after(5):
            await ended.wait()
        assert bytes(got) == b"x" + data
        assert calls > 2


async def test_the_reader_hears_a_reset_and_receive_works_again_without_it() -> None:
    async with node_pair() as (a, b):
        listener = await b.listen(7)
        first = await a.connect(b.address, 7)
        await first.send(b"1")
        incoming: OverlayStream = await listener.accept()
        errors: list[BaseException] = []
        heard = anyio.Event()

        def on_readable() -> None:
            try:
                incoming.receive_nowait()
            except StreamReset as exc:
                errors.append(exc)
                heard.set()

        incoming.set_reader(on_readable)
        first.reset()
        with anyio.fail_after(5):
            await heard.wait()
        assert isinstance(errors[0], StreamReset)

        second = await a.connect(b.address, 7)
        await second.send(b"2")
        other = await listener.accept()
        other.set_reader(lambda: None)
        other.set_reader(None)  # back to tasks
        with anyio.fail_after(5):
            assert await other.receive() == b"2"


async def test_try_send_declines_while_a_send_waits_for_room() -> None:
    async with node_pair() as (a, b):
        listener = await b.listen(7)
        stream = await a.connect(b.address, 7)
        await stream.send(b"x")
        await listener.accept()  # and never read: the window fills
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.send, payload(16 << 20))
            await anyio.wait_all_tasks_blocked()  # the send filled the buffer and waits
            assert stream._sending
            assert not stream.try_send(b"small")  # would cut into the send under way
            tg.cancel_scope.cancel()
        assert not stream._sending  # the cancelled send is over
