"""Node on loopback against the baselines it must beat, side by side in one run.

* bulk: one stream, `--mib` MiB one way, overlay vs a plain TCP connection
  (anyio streams, same event loop, same chunk size);
* round trip: a 200-byte message echoed over an open stream, overlay vs a raw
  asyncio UDP echo (DatagramProtocol on both ends) and vs TCP.

Rounds are interleaved (overlay, baseline, overlay, ...) because this machine
is shared and noisy: compare the ratios, not the absolute figures.

Run:  .venv/bin/python benchmarks/bench_node.py [--backend asyncio|trio] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import ByteStream

from overlay_httpx import Identity, Node

CHUNK = 1 << 20
MESSAGE = b"m" * 200


async def _drain(stream: ByteStream) -> int:
    total = 0
    while True:
        try:
            total += len(await stream.receive(CHUNK))
        except anyio.EndOfStream:
            return total


async def _bulk(
    sender: ByteStream, receiver_ready: Callable[[], Awaitable[ByteStream]], size: int
) -> float:
    data = b"\x5a" * CHUNK
    received = 0

    async def receive() -> None:
        nonlocal received
        received = await _drain(await receiver_ready())

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(receive)
        for _ in range(size // CHUNK):
            await sender.send(data)
        await sender.send_eof()
    elapsed = time.perf_counter() - start
    assert received == size, (received, size)
    return size / elapsed / 1e6


async def overlay_bulk(a: Node, b: Node, size: int) -> float:
    listener = await b.listen(9000)
    stream = await a.connect(b.address, 9000)
    try:
        return await _bulk(stream, listener.accept, size)
    finally:
        await stream.aclose()
        await listener.aclose()


async def tcp_bulk(size: int) -> float:
    accepted: list[ByteStream] = []
    ready = anyio.Event()

    async def handle(stream: ByteStream) -> None:
        accepted.append(stream)
        ready.set()
        await anyio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        client = await anyio.connect_tcp("127.0.0.1", port)

        async def server_side() -> ByteStream:
            await ready.wait()
            return accepted[0]

        try:
            return await _bulk(client, server_side, size)
        finally:
            await client.aclose()
            tg.cancel_scope.cancel()


async def _round_trips(
    send: Callable[[bytes], Awaitable[None]], receive: Callable[[], Awaitable[bytes]], count: int
) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await send(MESSAGE)
        got = 0
        while got < len(MESSAGE):
            got += len(await receive())
        samples.append(time.perf_counter() - start)
    return samples


async def overlay_rtt(a: Node, b: Node, count: int) -> list[float]:
    listener = await b.listen(9001)

    async def echo_one(stream: ByteStream) -> None:
        while True:
            try:
                await stream.send(await stream.receive())
            except anyio.EndOfStream:
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo_one)
        stream = await a.connect(b.address, 9001)
        samples = await _round_trips(stream.send, stream.receive, count)
        await stream.aclose()
        await listener.aclose()
        tg.cancel_scope.cancel()
    return samples


async def udp_rtt(count: int) -> list[float]:
    """A raw asyncio UDP echo: the floor any tunnel over UDP sits on."""
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(data, addr)  # type: ignore[attr-defined]

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            replies.put_nowait(data)

    server, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    port = server.get_extra_info("sockname")[1]
    client, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))

    async def send(data: bytes) -> None:
        client.sendto(data)

    try:
        return await _round_trips(send, replies.get, count)
    finally:
        client.close()
        server.close()


async def tcp_rtt(count: int) -> list[float]:
    async def echo_one(stream: ByteStream) -> None:
        while True:
            try:
                await stream.send(await stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo_one)
        client = await anyio.connect_tcp("127.0.0.1", port)
        samples = await _round_trips(client.send, client.receive, count)
        await client.aclose()
        tg.cancel_scope.cancel()
    return samples


def _p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


async def main(args: argparse.Namespace) -> dict[str, object]:
    size = args.mib << 20
    bulk: dict[str, list[float]] = {"overlay": [], "tcp": []}
    rtt: dict[str, list[float]] = {"overlay": [], "udp": [], "tcp": []}
    async with Node(Identity.generate()) as a, Node(Identity.generate()) as b:
        a.add_peer(b.address, b.public, b.endpoint)
        b.add_peer(a.address, a.public, a.endpoint)
        await overlay_rtt(a, b, 50)  # warm up the tunnel
        for round_ in range(args.rounds):
            bulk["overlay"].append(await overlay_bulk(a, b, size))
            bulk["tcp"].append(await tcp_bulk(size))
            rtt["overlay"].append(_p50_us(await overlay_rtt(a, b, args.messages)))
            if args.backend == "asyncio":
                rtt["udp"].append(_p50_us(await udp_rtt(args.messages)))
            rtt["tcp"].append(_p50_us(await tcp_rtt(args.messages)))
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
        stats = a.statistics()
    result: dict[str, object] = {
        "backend": args.backend,
        "bulk_mib": args.mib,
        "rounds": args.rounds,
        "max_datagram_size": stats.max_datagram_size,
        "bulk_MBps": {k: statistics.median(v) for k, v in bulk.items()},
        "rtt_p50_us": {k: statistics.median(v) for k, v in rtt.items() if v},
    }
    b_ = result["bulk_MBps"]
    r_ = result["rtt_p50_us"]
    assert isinstance(b_, dict)
    assert isinstance(r_, dict)
    print(f"\nbackend {args.backend}, {args.rounds} interleaved rounds, medians\n")
    print("| measure | overlay | baseline | ratio |")
    print("|---|---|---|---|")
    print(
        f"| bulk {args.mib} MiB, MB/s | {b_['overlay']:.0f} | TCP {b_['tcp']:.0f} "
        f"| {b_['overlay'] / b_['tcp']:.2f}x |"
    )
    if "udp" in r_:
        print(
            f"| 200 B round trip p50, µs | {r_['overlay']:.0f} | raw UDP {r_['udp']:.0f} "
            f"| {r_['overlay'] / r_['udp']:.2f}x |"
        )
    print(
        f"| 200 B round trip p50, µs | {r_['overlay']:.0f} | TCP {r_['tcp']:.0f} "
        f"| {r_['overlay'] / r_['tcp']:.2f}x |"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--json", help="also write the figures to this file")
    ns = parser.parse_args()
    out = anyio.run(main, ns, backend=ns.backend)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(out, f, indent=2)
