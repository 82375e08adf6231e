"""The tunnel core's own cost per packet: pure Python against the mypyc-compiled build.

Two sans-IO endpoints in one process, no sockets and no event loop: a 200-byte
message goes from one to the other over an open stream and is echoed back,
everything the core does per packet included (sealing and opening, frames,
ACKs, recovery, congestion control, streams, timers). Each build runs in its
own child process; rounds alternate between them; the figure is the fastest
round's µs per round trip (two packets, each built and handled once).

Run:  tools/build_compiled.sh && .venv/bin/python benchmarks/bench_core.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPILED_TREE = ROOT / "build" / "compiled"


def child(count: int) -> None:
    """Answer each line on stdin with one timed batch of `count` round trips."""
    from overlay_httpx import Address, Identity
    from overlay_httpx._protocol import COMPILED
    from overlay_httpx._protocol._endpoint import Endpoint
    from overlay_httpx._protocol._events import StreamReadable

    a_addr, b_addr = ("10.0.0.1", 4000), ("10.0.0.2", 5000)
    a = Endpoint(Identity.generate(), Address(1, 1))
    b = Endpoint(Identity.generate(), Address(1, 2))
    b.listen(80)
    now = 1000.0

    def deliver(src: Endpoint, dst: Endpoint, addr: tuple[str, int]) -> int:
        out = src.datagrams_to_send(now)
        for data, _ in out:
            dst.receive_datagram(data, addr, now)
        return len(out)

    ta = a.connect(b.public, b_addr, now)
    sid = ta.open_stream(80, now)
    while deliver(a, b, a_addr) + deliver(b, a, b_addr):
        pass
    tb = b.tunnel(a.public)
    assert tb is not None
    message = b"x" * 200

    def round_trip() -> None:
        nonlocal now
        now += 0.0002
        ta.send_stream(sid, message)
        deliver(a, b, a_addr)
        while (event := b.next_event()) is not None:
            if isinstance(event, StreamReadable):
                tb.send_stream(event.stream_id, tb.read_stream(event.stream_id, now=now))
        now += 0.0002
        deliver(b, a, b_addr)
        got = b""
        while (event := a.next_event()) is not None:
            if isinstance(event, StreamReadable):
                got += ta.read_stream(event.stream_id, now=now)
        if got != message:
            raise RuntimeError(f"echo came back as {len(got)} bytes, expected {len(message)}")
        for endpoint in (a, b):
            timer = endpoint.get_timer()
            if timer is not None and timer <= now:
                endpoint.handle_timer(now)

    for _ in range(count // 5):  # warm-up
        round_trip()
    print(json.dumps({"compiled": COMPILED}), flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        for _ in range(count):
            round_trip()
        print(json.dumps({"us": (time.perf_counter() - start) / count * 1e6}), flush=True)


def spawn(compiled: bool, count: int) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if compiled:
        env["PYTHONPATH"] = str(COMPILED_TREE)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    hello = json.loads(proc.stdout.readline())
    if hello["compiled"] != compiled:
        proc.kill()
        want = "compiled" if compiled else "pure-Python"
        raise SystemExit(f"bench_core: the {want} child imported the other build")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=5000, help="round trips per round")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if not COMPILED_TREE.is_dir():
        raise SystemExit("bench_core: no build/compiled; run tools/build_compiled.sh first")
    builds = {"pure Python": spawn(False, args.count), "compiled": spawn(True, args.count)}
    results: dict[str, list[float]] = {name: [] for name in builds}
    try:
        for round_ in range(args.rounds):
            order = list(builds) if round_ % 2 == 0 else list(reversed(builds))
            for name in order:
                proc = builds[name]
                assert proc.stdin is not None
                assert proc.stdout is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
                results[name].append(json.loads(proc.stdout.readline())["us"])
    finally:
        for proc in builds.values():
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(10)
    pure = min(results["pure Python"])
    print("| build | µs per round trip (best) | median | speed-up |")
    print("|---|---|---|---|")
    for name, values in results.items():
        best = min(values)
        print(f"| {name} | {best:.1f} | {statistics.median(values):.1f} | {pure / best:.2f}x |")


if __name__ == "__main__":
    main()
