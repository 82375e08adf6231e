"""Efficiency of the sans-IO tunnel on a simulated path (virtual time, deterministic).

Measures, for a one-way 10 MiB transfer over a 50 ms RTT, 100 Mbit/s path:
  * datagrams the sender sent, against the minimum that could carry the bytes;
  * goodput at 1 % loss against goodput without loss on the same path.
Run:  .venv/bin/python benchmarks/bench_tunnel_sim.py
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "protocol"))

from _harness import A_ADDR, B_ADDR, make_pair, payload

from overlay_httpx._protocol._config import TunnelConfig
from overlay_httpx._protocol._packet import DATA_HEADER_SIZE
from overlay_httpx.testing import LinkConfig

SIZE = 10 << 20
MDS = 1200


def transfer(loss: float, seed: int) -> tuple[float, int, float]:
    """(virtual seconds, datagrams sent by the sender, wall seconds)."""
    link = LinkConfig(loss=loss, delay=0.025, bandwidth=100e6, queue_bytes=int(100e6 / 8 * 0.05))
    net, a, b = make_pair(
        seed=seed, link=link, config=TunnelConfig(max_datagram_size=MDS), echo=False
    )
    data = payload(SIZE)
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    sid = tunnel.open_stream(80, net.now)
    a.write(tunnel, sid, data, fin=True)
    wall = time.perf_counter()
    ok = net.run(until=lambda: any(st.eof for st in b.streams.values()), timeout=3600)
    wall = time.perf_counter() - wall
    assert ok, "transfer did not finish"
    (received,) = [bytes(st.received) for st in b.streams.values()]
    assert received == data, "data corrupted"
    sent = net.statistics_for(A_ADDR, B_ADDR).sent
    return net.now, sent, wall


def main() -> None:
    per_datagram = MDS - DATA_HEADER_SIZE - 16 - 8  # header, tag, STREAM frame header
    minimum = math.ceil(SIZE / per_datagram)
    t0, sent0, w0 = transfer(0.0, 1)
    rows = [("0 %", t0, sent0, w0)]
    for seed in (2, 3, 4):
        rows.append(("1 %", *transfer(0.01, seed)))
    print("| loss | virtual s | goodput Mbit/s | datagrams sent | vs minimum | wall s |")
    print("|---|---|---|---|---|---|")
    for label, t, sent, wall in rows:
        goodput = SIZE * 8 / t / 1e6
        print(
            f"| {label} | {t:.2f} | {goodput:.1f} | {sent} | {sent / minimum:.3f}x | {wall:.1f} |"
        )
    lossy = [SIZE / t for _, t, _, _ in rows[1:]]
    ratio = (sum(lossy) / len(lossy)) / (SIZE / t0)
    print(f"\nminimum datagrams for 10 MiB at {MDS} B: {minimum}")
    print(f"datagrams at 0 % loss: {sent0 / minimum:.3f}x the minimum (target <= 1.05x)")
    print(f"goodput at 1 % loss: {ratio:.2f}x the lossless goodput (target >= 0.70x)")


if __name__ == "__main__":
    main()
