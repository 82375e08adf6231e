"""Streams opened without waiting for the handshake (``Node.connect(..., wait=False)``):
what is sent before the keys exist arrives once they do, and the handshake's failure
reaches `wait_established` as `connect` would have raised it."""

from __future__ import annotations

import anyio
import pytest
from _nodes import node_pair, receive_all, serve_echo
from _peers import SilentPeer

from overlay_httpx import (
    HandshakeTimeout,
    Identity,
    Node,
    OverlayStream,
    TrustRefused,
    TunnelClosed,
)

pytestmark = pytest.mark.anyio


async def test_what_is_sent_before_the_keys_arrives_once_they_exist() -> None:
    async with node_pair() as (a, b), anyio.create_task_group() as tg:
        tg.start_soon(serve_echo, await b.listen(7))
        stream = await a.connect(b.address, 7, wait=False)
        assert not stream.established  # the INIT is only on its way
        assert stream.try_send(b"made during the round trip, ")
        await stream.send(b"and sent before the answer")
        await stream.send_eof()
        with anyio.fail_after(5):
            assert await receive_all(stream) == (
                b"made during the round trip, and sent before the answer"
            )
            await stream.wait_established()  # long done: returns at once
        assert stream.established
        (tunnel,) = a.statistics().tunnels
        assert tunnel.handshakes == 1
        tg.cancel_scope.cancel()


async def test_streams_opened_early_share_one_handshake_with_those_that_wait() -> None:
    async with node_pair() as (a, b):
        listener = await b.listen(5)
        early = [await a.connect(b.address, 5, wait=False) for _ in range(5)]
        waited = await a.connect(b.address, 5)
        assert waited.established
        with anyio.fail_after(5):
            for stream in early:
                await stream.wait_established()
        (tunnel,) = a.statistics().tunnels
        assert tunnel.handshakes == 1
        for stream in (*early, waited):
            await stream.aclose()
        await listener.aclose()


async def test_a_handshake_that_times_out_fails_the_wait_and_the_stream() -> None:
    async with Node(Identity.generate(), handshake_timeout=0.3) as a:
        with SilentPeer(a) as peer:
            address = peer.address
            with anyio.fail_after(1):
                stream = await a.connect(address, 80, wait=False)  # no wait for the answer
            stream.try_send(b"GET / HTTP/1.1\r\n\r\n")
            with anyio.fail_after(3), pytest.raises(HandshakeTimeout) as info:
                await stream.wait_established()
            assert str(address) in str(info.value)
            assert info.value.port == 80
            # The stream failed with its tunnel, and a later wait says how, at once.
            with pytest.raises(TunnelClosed, match="handshake timed out"):
                await stream.receive()
            with anyio.fail_after(1), pytest.raises(HandshakeTimeout, match=str(address)):
                await stream.wait_established()
            await stream.aclose()  # closing it here changes nothing about how it ended
            with pytest.raises(HandshakeTimeout):
                await stream.wait_established()


async def test_a_stream_closed_before_its_handshake_ends_is_a_closed_resource() -> None:
    async with Node(Identity.generate(), handshake_timeout=10) as a:
        with SilentPeer(a) as peer:
            address = peer.address
            stream = await a.connect(address, 80, wait=False)
            other = await a.connect(address, 80, wait=False)
            await stream.aclose()
            with anyio.fail_after(1), pytest.raises(anyio.ClosedResourceError):
                await stream.wait_established()
            assert not other.established  # the handshake goes on
            assert not other.broken


async def test_a_refused_handshake_fails_the_wait_as_trust_refused() -> None:
    async with node_pair(trust=lambda identity, address: False) as (a, b):
        await b.listen(7)
        stream: OverlayStream = await a.connect(b.address, 7, wait=False)
        with anyio.fail_after(5), pytest.raises(TrustRefused):
            await stream.wait_established()
        assert stream.broken
        with pytest.raises(TrustRefused):  # and again, after the fact
            await stream.wait_established()


async def test_a_wait_on_a_stream_closed_meanwhile_ends_closed_when_the_handshake_does() -> None:
    """Closed or reset here while its handshake went on, a stream is no use once the
    keys exist: a wait blocked before, or begun after, says so."""
    b_identity = Identity.generate()
    async with Node(Identity.generate(), handshake_timeout=10) as a:
        with SilentPeer(a, b_identity) as peer:
            b_address, port = peer.address, peer.port
            closed = await a.connect(b_address, 7, wait=False)
            reset = await a.connect(b_address, 7, wait=False)
        outcome: list[BaseException] = []

        async def wait() -> None:
            try:
                await closed.wait_established()
            except anyio.ClosedResourceError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()  # waiting: the peer does not answer yet
            assert not outcome
            await closed.aclose()
            reset.reset()
            # The peer comes up where the handshake retries go.
            async with Node(b_identity, bind=f"127.0.0.1:{port}") as b:
                listener = await b.listen(7)
                with anyio.fail_after(5):
                    await (await a.connect(b_address, 7)).aclose()  # the keys exist now
                await listener.aclose()
        assert len(outcome) == 1
        with pytest.raises(anyio.ClosedResourceError):
            await reset.wait_established()
