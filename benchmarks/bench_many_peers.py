"""What one more connected peer costs a busy endpoint: the sans-IO core, in one process.

A server endpoint holds N established, idle tunnels (one per client endpoint,
each with a finished request behind it). One client then sends a small
stream write; timed is the server's work for that datagram: taking it in,
answering it (`datagrams_to_send`, which also acknowledges it) and working
out its next timer. The N = 1 row is the baseline of the same run: the cost
should not grow with N, since the endpoint asks only the tunnels something
happened to.

Run:  .venv/bin/python benchmarks/bench_many_peers.py [--peers 1 10 100 1000] [--samples 400]
"""

from __future__ import annotations

import argparse
import statistics
import time

from overlay_httpx import Address, Identity
from overlay_httpx._protocol._endpoint import Endpoint
from overlay_httpx._protocol._tunnel import Tunnel

SERVER = ("10.0.0.1", 5000)


class Star:
    """A server endpoint and its clients, driven by hand with an explicit clock."""

    def __init__(self) -> None:
        self.now = 1.0
        self.server = Endpoint(Identity.generate(), Address(1, 1))
        self.server.listen(80)
        self.clients: list[tuple[Endpoint, Tunnel, tuple[str, int]]] = []

    def _exchange(self, client: Endpoint, addr: tuple[str, int]) -> None:
        """Deliver datagrams both ways until neither side has anything to say."""
        for _ in range(6):
            out = client.datagrams_to_send(self.now)
            for data, _ in out:
                self.server.receive_datagram(data, addr, self.now)
            back = self.server.datagrams_to_send(self.now)
            for data, _ in back:
                client.receive_datagram(data, SERVER, self.now)
            if not out and not back:
                return

    def add(self) -> None:
        i = len(self.clients)
        self.now += 0.01  # within the server's handshake budget
        client = Endpoint(Identity.generate(), Address(2, i))
        addr = (f"10.{1 + i // 60000}.{i // 250 % 240}.{i % 250}", 4000)
        tunnel = client.connect(self.server.public, SERVER, self.now)
        sid = tunnel.open_stream(80, self.now)
        tunnel.send_stream(sid, b"hello", end_stream=True)
        self._exchange(client, addr)
        if not tunnel.is_established:
            raise RuntimeError(f"client {i} did not get a tunnel")
        self.clients.append((client, tunnel, addr))

    def one_datagram_us(self, samples: int) -> float:
        """Median server time for one client's small write (receive, answer, timer)."""
        times = []
        client, tunnel, addr = self.clients[len(self.clients) // 2]
        sid = tunnel.open_stream(80, self.now)
        for i in range(samples + 100):  # the first 100 warm up
            self.now += 0.001
            tunnel.send_stream(sid, b"x" * 64)
            [(data, _)] = client.datagrams_to_send(self.now)
            start = time.perf_counter()
            self.server.receive_datagram(data, addr, self.now)
            back = self.server.datagrams_to_send(self.now + 0.03)  # its ACK is due
            self.server.get_timer()
            if i >= 100:
                times.append(time.perf_counter() - start)
            for reply, _ in back:
                client.receive_datagram(reply, SERVER, self.now)
        return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--samples", type=int, default=400)
    args = parser.parse_args()
    star = Star()
    base: float | None = None
    print("| established peers | server µs per datagram (p50) | vs 1 peer |")
    print("|---|---|---|")
    for count in sorted(args.peers):
        while len(star.clients) < count:
            star.add()
        us = star.one_datagram_us(args.samples)
        base = us if base is None else base
        print(f"| {count} | {us:.1f} | {us / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
