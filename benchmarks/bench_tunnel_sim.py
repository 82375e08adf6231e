"""Efficiency of the sans-IO tunnel on a simulated path (virtual time, deterministic).

Measures, for a one-way 10 MiB transfer over a 50 ms RTT, 100 Mbit/s path with
a drop-tail queue of one bandwidth-delay product, for each congestion
controller (`TunnelConfig.congestion_control`):
  * datagrams the sender sent, against the minimum that could carry the bytes;
  * goodput at 1 % random loss (three seeds) against goodput without loss;
  * goodput at 1 % loss with a shallow queue of 1/4 BDP;
  * goodput at 0 % and 1 % loss with flow-control windows and send buffer so
    large (16 MiB per stream, 64 MiB per tunnel) that only congestion control
    limits the sender: with the defaults (256 KiB / 1 MiB initial, auto-tuned)
    head-of-line blocking behind lost packets and lost window updates stall
    it too, which no congestion controller can fix.
Run:  .venv/bin/python benchmarks/bench_tunnel_sim.py [--controllers bbr,newreno]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "protocol"))

from _harness import A_ADDR, B_ADDR, make_pair, payload

from overlay_httpx._protocol._config import TunnelConfig
from overlay_httpx._protocol._packet import DATA_HEADER_SIZE
from overlay_httpx.testing import LinkConfig

SIZE = 10 << 20
MDS = 1200
BANDWIDTH = 100e6
RTT = 0.05
BDP_BYTES = int(BANDWIDTH / 8 * RTT)
LOSSY_SEEDS = (2, 3, 4)


class Row(NamedTuple):
    controller: str
    loss: float
    queue: str
    windows: str
    seconds: float  # virtual
    sent: int  # datagrams from the sender
    wall: float


def transfer(
    controller: str, loss: float, seed: int, queue_bdp: float = 1.0, big_windows: bool = False
) -> tuple[float, int, float]:
    """(virtual seconds, datagrams sent by the sender, wall seconds)."""
    link = LinkConfig(
        loss=loss, delay=RTT / 2, bandwidth=BANDWIDTH, queue_bytes=int(BDP_BYTES * queue_bdp)
    )
    windows: dict[str, int] = {}
    if big_windows:  # flow control and the send buffer never limit the sender
        windows = {
            "initial_max_stream_data": 16 << 20,
            "initial_max_data": 64 << 20,
            "send_buffer_limit": 16 << 20,
        }
    config = TunnelConfig(
        max_datagram_size=MDS,
        congestion_control=controller,  # type: ignore[arg-type]
        **windows,  # type: ignore[arg-type]
    )
    net, a, b = make_pair(seed=seed, link=link, config=config, echo=False)
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


def goodput(seconds: float) -> float:
    """Mbit/s of payload."""
    return SIZE * 8 / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--controllers", default="newreno,bbr", help="comma-separated names")
    controllers = parser.parse_args().controllers.split(",")

    per_datagram = MDS - DATA_HEADER_SIZE - 16 - 8  # header, tag, STREAM frame header
    minimum = math.ceil(SIZE / per_datagram)
    rows: list[Row] = []
    big = "16/64 MiB"
    for cc in controllers:
        rows.append(Row(cc, 0.0, "1 BDP", "default", *transfer(cc, 0.0, 1)))
        for seed in LOSSY_SEEDS:
            rows.append(Row(cc, 0.01, "1 BDP", "default", *transfer(cc, 0.01, seed)))
        rows.append(Row(cc, 0.01, "1/4 BDP", "default", *transfer(cc, 0.01, LOSSY_SEEDS[0], 0.25)))
        rows.append(Row(cc, 0.0, "1 BDP", big, *transfer(cc, 0.0, 1, big_windows=True)))
        rows.append(
            Row(cc, 0.01, "1 BDP", big, *transfer(cc, 0.01, LOSSY_SEEDS[0], big_windows=True))
        )

    print(
        "| controller | loss | queue | flow-control windows | virtual s | goodput Mbit/s "
        "| datagrams sent | vs minimum | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.controller} | {r.loss:.0%} | {r.queue} | {r.windows} | {r.seconds:.2f} "
            f"| {goodput(r.seconds):.1f} | {r.sent} | {r.sent / minimum:.3f}x | {r.wall:.1f} |"
        )
    print(f"\nminimum datagrams for 10 MiB at {MDS} B: {minimum}")
    for cc in controllers:
        mine = [r for r in rows if r.controller == cc and r.windows == "default"]
        lossless = mine[0]
        lossy = [r for r in mine if r.loss and r.queue == "1 BDP"]
        shallow = [r for r in mine if r.queue != "1 BDP"]
        ratio = (sum(SIZE / r.seconds for r in lossy) / len(lossy)) / (SIZE / lossless.seconds)
        big_clean, big_lossy = [r for r in rows if r.controller == cc and r.windows == big]
        print(
            f"{cc}: datagrams at 0 % loss {lossless.sent / minimum:.3f}x the minimum "
            f"(target <= 1.05x); goodput at 1 % loss {ratio:.2f}x the lossless goodput "
            f"(target >= 0.70x); with a 1/4-BDP queue "
            f"{lossless.seconds / shallow[0].seconds:.2f}x; with big windows "
            f"{big_clean.seconds / big_lossy.seconds:.2f}x"
        )


if __name__ == "__main__":
    main()
