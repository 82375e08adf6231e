"""Readers, writers and accept() wait on a bare future on asyncio (an anyio.Event on trio):
cancelling any of them must leave nothing behind that a later wake-up trips over."""

from __future__ import annotations

import asyncio

import anyio
import pytest
from _nodes import node_pair, payload, receive_all

from overlay_httpx import TrustRefused
from overlay_httpx._node._stream import FutureWaiter, waiter_factory

pytestmark = pytest.mark.anyio


async def test_waiter_of_the_running_loop(anyio_backend: str) -> None:
    waiter = waiter_factory()()
    assert isinstance(waiter, FutureWaiter) == (anyio_backend == "asyncio")
    waiter.set()
    waiter.set()  # twice is harmless
    with anyio.fail_after(1):
        await waiter.wait()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cancelled_future_waiter_ignores_set() -> None:
    waiter = FutureWaiter(asyncio.get_running_loop())
    with anyio.move_on_after(0.01) as scope:
        await waiter.wait()
    assert scope.cancelled_caught
    waiter.set()  # would raise InvalidStateError on the cancelled future


async def test_cancelled_accept_then_a_stream_arrives() -> None:
    async with node_pair() as (a, b):
        listener = await b.listen(7)
        with anyio.move_on_after(0.05) as scope:
            await listener.accept()
        assert scope.cancelled_caught
        stream = await a.connect(b.address, 7)
        await stream.send(b"hi")  # wakes the abandoned waiter: nothing happens
        with anyio.fail_after(5):
            incoming = await listener.accept()
            assert await incoming.receive() == b"hi"


async def test_many_cancelled_receives_then_data() -> None:
    async with node_pair() as (a, b):
        listener = await b.listen(7)
        stream = await a.connect(b.address, 7)
        await stream.send(b"0")
        incoming = await listener.accept()
        assert await incoming.receive() == b"0"
        for i in range(1, 6):
            with anyio.move_on_after(0.01):
                await incoming.receive()
            await stream.send(b"%d" % i)
            with anyio.fail_after(5):
                assert await incoming.receive() == b"%d" % i
        await stream.send_eof()
        with anyio.fail_after(5):
            assert await receive_all(incoming) == b""


async def test_send_takes_bytes_bytearray_and_memoryview() -> None:
    async with node_pair() as (a, b):
        listener = await b.listen(7)
        stream = await a.connect(b.address, 7)
        await stream.send(b"ab")
        await stream.send(bytearray(b"cd"))
        await stream.send(memoryview(b"\x00ef\x00")[1:3])
        await stream.send(memoryview(bytearray(b"gh")).cast("H"))  # counted in bytes
        await stream.send(b"")
        assert stream.bytes_sent == 8
        await stream.send_eof()
        incoming = await listener.accept()
        with anyio.fail_after(5):
            assert await receive_all(incoming) == b"abcdefgh"


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


async def test_try_send_takes_any_bytes_like_object() -> None:
    """bytearray and memoryview too, on both builds of the core (the compiled one takes
    only bytes, so the stream converts)."""
    async with node_pair() as (a, b):
        listener = await b.listen(7)
        stream = await a.connect(b.address, 7)
        assert stream.try_send(bytearray(b"one "))
        assert stream.try_send(memoryview(b"two "))
        assert stream.try_send(b"three")
        await stream.send_eof()
        peer = await listener.accept()
        assert await receive_all(peer) == b"one two three"


class _Index:
    """An integer-like that is not an int (numpy integers are such)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


async def test_receive_and_reset_take_integer_likes_and_refuse_the_rest() -> None:
    async with node_pair() as (a, b):
        listener = await b.listen(7)
        stream = await a.connect(b.address, 7)
        await stream.send(b"abc")
        peer = await listener.accept()
        with pytest.raises(TypeError, match=r"^max_bytes=1024\.0: expected a whole number$"):
            await peer.receive(1024.0)  # type: ignore[arg-type]
        assert await peer.receive(_Index(2)) == b"ab"  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"^error_code=4611686018427387904: expected 0"):
            stream.reset(2**62)
        with pytest.raises(TypeError, match=r"^error_code=True: expected a whole number$"):
            stream.reset(True)
        stream.reset(_Index(3))  # type: ignore[arg-type]
        with pytest.raises(anyio.ClosedResourceError):
            await stream.send(b"after the reset")


@pytest.mark.parametrize(
    ("answer", "admitted"), [(1, True), ("yes", True), (0, False), ([], False)]
)
async def test_a_trust_callback_may_answer_with_any_truthy_or_falsy_value(
    answer: object, admitted: bool
) -> None:
    """The core takes True, False or None; the node turns other answers into those, on
    both builds (the compiled core would refuse an int as a bool)."""
    async with node_pair(trust=lambda identity, address: answer) as (a, b):
        await b.listen(7)
        if admitted:
            stream = await a.connect(b.address, 7)
            await stream.aclose()
        else:
            with pytest.raises(TrustRefused):
                await a.connect(b.address, 7)
