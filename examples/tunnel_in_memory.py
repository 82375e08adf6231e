"""Two overlay endpoints exchange 1 MiB over a simulated lossy path, in virtual time.

The protocol core is sans-IO, so the whole handshake, loss recovery and
transfer runs here without a socket, deterministically:

    .venv/bin/python examples/tunnel_in_memory.py
"""

from __future__ import annotations

import hashlib

from overlay_httpx import Address, Identity
from overlay_httpx._protocol._endpoint import Endpoint
from overlay_httpx._protocol._events import StreamReadable
from overlay_httpx.testing import LinkConfig, Network

ALICE, BOB = ("192.0.2.1", 4000), ("192.0.2.2", 4000)


class Receiver:
    """Bob: listens on port 80 and keeps what arrives."""

    def __init__(self) -> None:
        self.endpoint = Endpoint(Identity.generate(), Address(1, 2))
        self.endpoint.listen(80)
        self.data = bytearray()
        self.done = False

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        self.endpoint.receive_datagram(data, addr, now)
        while (event := self.endpoint.next_event()) is not None:
            if isinstance(event, StreamReadable):
                tunnel = self.endpoint.tunnel(event.peer)
                assert tunnel is not None
                self.data += tunnel.read_stream(event.stream_id, now=now)
                self.done = tunnel.stream_at_eof(event.stream_id)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        return self.endpoint.datagrams_to_send(now)

    def get_timer(self) -> float | None:
        return self.endpoint.get_timer()

    def handle_timer(self, now: float) -> None:
        self.endpoint.handle_timer(now)


def main() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    net = Network(seed=7, link=LinkConfig(loss=0.05, reorder=0.02, delay=0.02))
    alice = Endpoint(Identity.generate(), Address(1, 1))
    bob = Receiver()
    net.add(alice, ALICE)
    net.add(bob, BOB)

    tunnel = alice.connect(bob.endpoint.public, BOB, net.now)
    stream = tunnel.open_stream(80, net.now)
    tunnel.send_stream(stream, payload, end_stream=True)
    assert net.run(until=lambda: bob.done, timeout=120)

    ok = hashlib.sha256(bob.data).digest() == hashlib.sha256(payload).digest()
    stats = tunnel.statistics()
    print(f"delivered {len(bob.data)} bytes intact={ok} in {net.now:.2f} virtual s")
    print(f"path: 5 % loss, 2 % reordering, 40 ms RTT; network: {net.statistics()}")
    print(
        f"alice sent {stats.packets_sent} packets, {stats.packets_lost} declared lost, "
        f"srtt {stats.smoothed_rtt * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
