"""Node on real UDP sockets on 127.0.0.1: streams, errors, restarts, rebinding."""

from __future__ import annotations

import hashlib
import logging
import socket

import anyio
import pytest
from _nodes import (
    echo,
    introduce,
    node_pair,
    payload,
    receive_all,
    send_all_then_eof,
    serve_echo,
    sha_of_stream,
)

from overlay_httpx import (
    Address,
    HandshakeTimeout,
    Identity,
    LocalProtocolError,
    Node,
    OverlayAttribute,
    OverlayStream,
    PeerRestarted,
    PortInUse,
    PortUnreachable,
    TunnelClosed,
    UnknownPeer,
)

pytestmark = pytest.mark.anyio


async def _echo_round(client: Node, server: Node, data: bytes, port: int = 7) -> bytes:
    stream = await client.connect(server.address, port)
    async with stream, anyio.create_task_group() as tg:
        tg.start_soon(send_all_then_eof, stream, data)
        return await receive_all(stream)


@pytest.mark.parametrize("size", [0, 1, 1 << 20])
async def test_echo_each_way(size: int) -> None:
    data = payload(size, seed=size)
    async with node_pair() as (a, b), anyio.create_task_group() as tg:
        tg.start_soon(serve_echo, await a.listen(7))
        tg.start_soon(serve_echo, await b.listen(7))
        assert await _echo_round(a, b, data) == data
        assert await _echo_round(b, a, data) == data
        tg.cancel_scope.cancel()


def _rcvbuf_errors() -> int | None:
    try:
        with open("/proc/net/snmp") as f:
            lines = [line.split() for line in f if line.startswith("Udp:")]
    except OSError:
        return None
    header, values = lines[0], lines[1]
    if "RcvbufErrors" not in header:
        return None
    return int(values[header.index("RcvbufErrors")])


async def test_64_mib_each_way_without_receive_buffer_drops() -> None:
    size = 64 << 20
    data = payload(size, seed=64)
    want = hashlib.sha256(data).hexdigest()
    before = _rcvbuf_errors()
    async with node_pair() as (a, b):
        for sender, receiver in ((a, b), (b, a)):
            listener = await receiver.listen(9)
            stream = await sender.connect(receiver.address, 9)
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_all_then_eof, stream, data)
                incoming = await listener.accept()
                got = await sha_of_stream(incoming)
            assert got == (want, size)
            await listener.aclose()
        stats = a.statistics()
        assert stats.receive_buffer >= 4 << 20, stats.receive_buffer
    after = _rcvbuf_errors()
    if before is None or after is None:
        pytest.skip("/proc/net/snmp has no RcvbufErrors here")
    assert after - before == 0, f"{after - before} datagrams dropped by full receive buffers"


async def test_200_concurrent_streams_share_one_tunnel() -> None:
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        results[i] = await _echo_round(a, b, payload(4000 + i, seed=i))

    async with node_pair() as (a, b), anyio.create_task_group() as tg:
        tg.start_soon(serve_echo, await b.listen(7))
        async with anyio.create_task_group() as clients:
            for i in range(200):
                clients.start_soon(one, i)
        assert all(results[i] == payload(4000 + i, seed=i) for i in range(200))
        (tunnel,) = a.statistics().tunnels
        assert tunnel.handshakes == 1
        tg.cancel_scope.cancel()


async def test_concurrent_first_connects_share_one_handshake() -> None:
    async with node_pair() as (a, b):
        listener = await b.listen(5)
        streams: list[OverlayStream] = []

        async def connect() -> None:
            streams.append(await a.connect(b.address, 5))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(connect)
        assert len(streams) == 20
        assert len({s.extra(OverlayAttribute.peer_endpoint) for s in streams}) == 1
        (tunnel,) = a.statistics().tunnels
        assert tunnel.handshakes == 1
        for s in streams:
            await s.aclose()
        await listener.aclose()


async def test_half_close_both_ways() -> None:
    async with node_pair() as (a, b):
        listener = await b.listen(8)
        stream = await a.connect(b.address, 8)
        await stream.send(b"question")
        await stream.send_eof()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.send(b"more")
        incoming = await listener.accept()
        assert await receive_all(incoming) == b"question"
        # The other direction is still open after our EOF.
        await incoming.send(b"answer, ")
        await incoming.send(b"in two parts")
        await incoming.send_eof()
        assert await receive_all(stream) == b"answer, in two parts"

        # And the server half-closes first while the client keeps sending.
        stream = await a.connect(b.address, 8)
        await stream.send(b"x")
        incoming = await listener.accept()
        await incoming.send_eof()
        assert await receive_all(stream) == b""
        await stream.send(b"still sending")
        await stream.send_eof()
        assert await receive_all(incoming) == b"xstill sending"


async def test_typed_attributes_name_the_authenticated_peer() -> None:
    async with node_pair() as (a, b):
        listener = await b.listen(80)
        stream = await a.connect(b.address, 80)
        await stream.send(b"hi")
        incoming = await listener.accept()
        assert incoming.extra(OverlayAttribute.peer_address) == a.address
        assert incoming.extra(OverlayAttribute.peer_identity) == a.public
        assert incoming.extra(OverlayAttribute.port) == 80
        assert incoming.extra(OverlayAttribute.local_address) == b.address
        assert incoming.extra(OverlayAttribute.path) == "direct"
        assert stream.extra(OverlayAttribute.peer_address) == b.address
        assert stream.extra(OverlayAttribute.peer_endpoint) == b.endpoint
        assert listener.extra(OverlayAttribute.port) == 80
        await stream.aclose()
        await incoming.aclose()


async def test_closed_port_is_refused_within_a_round_trip() -> None:
    async with node_pair() as (a, b):
        stream = await a.connect(b.address, 81)
        await stream.send(b"anyone?")
        with anyio.fail_after(1), pytest.raises(PortUnreachable) as info:
            await stream.receive()
        assert isinstance(info.value, ConnectionRefusedError)
        assert str(b.address) in str(info.value)
        assert "port 81" in str(info.value)
        assert info.value.port == 81
        assert info.value.address == b.address
        with pytest.raises(PortUnreachable):
            await stream.send(b"again")


async def test_unknown_peer_fails_at_once() -> None:
    async with Node(Identity.generate()) as a:
        stranger = Address.parse("1:0001.dead.beef")
        with pytest.raises(UnknownPeer, match=r"1:0001\.dead\.beef") as info:
            await a.connect(stranger, 80)
        assert isinstance(info.value, LookupError)


async def test_dead_peer_times_out_the_handshake() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        async with Node(Identity.generate(), handshake_timeout=0.3) as a:
            ghost = Identity.generate()
            address = Address.parse("1:0001.0000.0042")
            a.add_peer(address, ghost.public, silent.getsockname())
            with anyio.fail_after(3), pytest.raises(HandshakeTimeout) as info:
                await a.connect(address, 80)
            assert isinstance(info.value, TimeoutError)
            assert "1:0001.0000.0042" in str(info.value)
            assert info.value.port == 80
    finally:
        silent.close()


async def test_listen_twice_and_misuse_are_clear_errors() -> None:
    with pytest.raises(LocalProtocolError, match="identity"):
        Node("not an identity")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="host:port"):
        Node(Identity.generate(), bind="localhost")
    idle = Node(Identity.generate())
    with pytest.raises(LocalProtocolError, match="async with"):
        await idle.connect("1:0001.0000.0001", 80)
    async with Node(Identity.generate()) as a:
        await a.listen(80)
        with pytest.raises(PortInUse, match="port 80"):
            await a.listen(80)
        with pytest.raises(LocalProtocolError, match=r"0\.\.65535"):
            await a.listen(70000)


async def test_address_is_stable_for_an_identity() -> None:
    identity = Identity.generate()
    async with Node(identity) as first:
        address = first.address
    async with Node(identity) as second:
        assert second.address == address
    async with Node(identity, address="1:0001.0000.0007") as third:
        assert third.address == Address.parse("1:0001.0000.0007")


async def test_closing_a_node_tells_its_peers() -> None:
    async with Node(Identity.generate()) as a:
        b = Node(Identity.generate())
        async with b:
            introduce(a, b)
            listener = await b.listen(7)
            stream = await a.connect(b.address, 7)
            await stream.send(b"x")
            incoming = await listener.accept()
            assert await incoming.receive() == b"x"
        # b is gone: a hears its CLOSE instead of waiting for the idle timeout.
        with anyio.fail_after(2), pytest.raises(TunnelClosed) as info:
            await stream.receive()
        assert info.value.by_peer
        assert [t.state for t in a.statistics().tunnels] in ([], ["closed"])


async def test_idle_timeout_closes_the_tunnel() -> None:
    async with node_pair(idle_timeout=0.4, keepalive=None) as (a, b):
        listener = await b.listen(7)
        stream = await a.connect(b.address, 7)
        await stream.send(b"x")
        incoming = await listener.accept()
        await b.aclose()  # silence without a CLOSE would need a crash; see the restart test
        with anyio.fail_after(3), pytest.raises(TunnelClosed):
            await stream.receive()
        del incoming


async def _crash(node: Node) -> None:
    """Stop a node without telling anyone (no CLOSE reaches its peers)."""
    assert node._udp is not None
    node._udp.close()
    node._linger = 0
    await node.aclose()


async def test_peer_restart_is_handled_transparently() -> None:
    identity = Identity.generate()
    async with Node(Identity.generate()) as a, anyio.create_task_group() as tg:
        b1 = Node(identity)
        await b1.__aenter__()
        introduce(a, b1)
        tg.start_soon(serve_echo, await b1.listen(7))
        old = await a.connect(b1.address, 7)
        await old.send(b"before")
        assert await old.receive() == b"before"
        where = b1.endpoint
        await _crash(b1)

        async with Node(identity, bind=where) as b2:
            tg.start_soon(serve_echo, await b2.listen(7))
            # A new stream after the restart just works...
            with anyio.fail_after(5):
                assert await _echo_round(a, b2, b"after") == b"after"
            # ...and the stream of the dead session fails with a clear error.
            with anyio.fail_after(5), pytest.raises(PeerRestarted, match="restarted"):
                await old.receive()
            tg.cancel_scope.cancel()


async def test_nat_rebinding_mid_transfer_completes() -> None:
    size = 16 << 20
    data = payload(size, seed=16)
    async with node_pair() as (a, b):
        listener = await b.listen(9)
        stream = await a.connect(b.address, 9)
        moved = anyio.Event()

        async def send() -> None:
            await stream.send(data[: size // 2])
            await a.rebind()
            moved.set()
            await send_all_then_eof(stream, data[size // 2 :])

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            incoming = await listener.accept()
            got = await sha_of_stream(incoming)
        assert moved.is_set()
        assert got == (hashlib.sha256(data).hexdigest(), size)
        (tunnel,) = b.statistics().tunnels
        assert tunnel.path_changes >= 1
        assert tunnel.remote_addr == a.endpoint


async def test_logging_is_silent_by_default_and_debug_names_handshakes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="overlay_httpx"):
        async with node_pair() as (a, b), anyio.create_task_group() as tg:
            tg.start_soon(serve_echo, await b.listen(7))
            await _echo_round(a, b, b"x")
            tg.cancel_scope.cancel()
    assert any("handshake with" in r.getMessage() for r in caplog.records)
    assert all(r.levelno <= logging.DEBUG for r in caplog.records)


async def test_echo_handler_runs_for_each_stream() -> None:
    async with node_pair() as (a, b), anyio.create_task_group() as tg:
        listener = await b.listen(7)
        tg.start_soon(listener.serve, echo)
        for i in range(5):
            assert await _echo_round(a, b, payload(100, seed=i)) == payload(100, seed=i)
        await listener.aclose()


async def test_cancelled_receive_and_send_leave_the_stream_usable() -> None:
    async with node_pair() as (a, b):
        listener = await b.listen(7)
        stream = await a.connect(b.address, 7)
        await stream.send(b"hello")
        incoming = await listener.accept()
        assert await incoming.receive() == b"hello"
        # A receive cancelled while waiting loses nothing.
        with anyio.move_on_after(0.05) as scope:
            await incoming.receive()
        assert scope.cancelled_caught
        await stream.send(b"after the cancel")
        assert await incoming.receive() == b"after the cancel"
        # A send blocked on a full buffer (nobody reads) can be cancelled; what it
        # queued stays in order and the stream keeps working.
        big = payload(8 << 20, seed=3)
        with anyio.move_on_after(0.2) as scope:
            await stream.send(big)
        assert scope.cancelled_caught
        await stream.send(b"tail")
        await stream.send_eof()
        received = await receive_all(incoming)
        assert received.endswith(b"tail")
        assert big.startswith(received[: -len(b"tail")])
        assert len(received) > len(b"tail")


async def test_sending_to_a_peer_that_closed_its_stream_is_a_clear_error() -> None:
    async with node_pair() as (a, b):
        listener = await b.listen(7)
        stream = await a.connect(b.address, 7)
        await stream.send(b"x")
        await stream.aclose()  # FIN and STOP_SENDING leave together
        incoming = await listener.accept()
        assert await receive_all(incoming) == b"x"
        with pytest.raises(anyio.BrokenResourceError, match="stopped reading"):
            await incoming.send(b"nobody reads this")
        await incoming.aclose()
