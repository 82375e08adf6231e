"""The reference article's table: a three-stage model chain over three transports.

Why: the article that motivates overlay_httpx ("I Stopped Restarting HTTP
Connections Between AI Models") reports, for a 3-stage chain of 1,000 sequential
inference requests, the per-request network overhead and the total time over
per-request HTTPS, HTTP keep-alive and a persistent tunnel. This reproduces that
table with real processes on this machine.

Three stage servers (`benchmarks/_chain_app.py`, a FastAPI app that "computes" for
`--compute-ms` with an async sleep and returns a small JSON) each run in child
processes three ways: uvicorn over TLS, uvicorn over TCP, and `serve()` on an overlay
node. The orchestrator, in this process, sends each chain stage1 -> stage2 -> stage3
(each stage's result is the next one's input) in three modes:
  * https-new    per-request HTTPS: one httpx client that keeps no connection, so
                 every call opens a new TCP + TLS connection (IP address: no DNS)
  * keep-alive   HTTP keep-alive: one httpx client, HTTP/1.1 over TCP
  * overlay      overlay_httpx: one httpx client on one OverlayTransport, one
                 persistent tunnel per stage node (peers introduced with add_peer)
Every server is warmed up first with throw-away clients (and a throw-away node).
Modes take turns in blocks of `--block` chains (order rotated each turn) so that
machine noise falls on all of them alike. Each mode's first chain runs on a new
client (and, for the overlay, a new node, so it includes the tunnel handshakes); it
counts in the totals and is also reported alone.

Per-request network overhead = (mean chain latency - 3 x compute) / 3, as in the
article; "outside the handler" subtracts the handlers' own measured time instead of
the nominal compute, so timer overshoot is not counted as network.

Run:  .venv/bin/python benchmarks/bench_chain.py                  (1000 chains, 20 ms)
      .venv/bin/python benchmarks/bench_chain.py --quick          (50 chains, < 30 s)
      .venv/bin/python benchmarks/bench_chain.py --compute-ms 200 --requests 200 --json c.json
This machine is shared and noisy: compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import ssl
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx
from _harness import Children, free_port, overlay_info, proc_cpu_seconds, self_signed, wait_port

APP = "_chain_app:app"
STAGES = 3
MODES = ("https-new", "keep-alive", "overlay")
LABELS = {
    "https-new": "Per-request HTTPS (new TLS connection per call, uvicorn)",
    "keep-alive": "HTTP keep-alive (one httpx client, TCP, uvicorn)",
    "overlay": "overlay_httpx (one OverlayTransport client, persistent tunnels)",
}


class Stages:
    """Per stage: uvicorn over TLS, uvicorn over TCP and an overlay node, each a child."""

    def __init__(self, children: Children, compute_ms: float) -> None:
        self.cert_key = self_signed(Path(tempfile.mkdtemp(prefix="bench_chain_")))
        self.tls_ports = [free_port() for _ in range(STAGES)]
        self.tcp_ports = [free_port() for _ in range(STAGES)]
        self.pids: dict[str, list[int]] = {mode: [] for mode in MODES}
        envs = [
            {"CHAIN_STAGE": f"stage{i + 1}", "CHAIN_COMPUTE_MS": str(compute_ms)}
            for i in range(STAGES)
        ]
        waits = []
        for env, tls_port, tcp_port in zip(envs, self.tls_ports, self.tcp_ports, strict=True):
            tls = children.uvicorn(APP, tls_port, self.cert_key, env)
            tcp = children.uvicorn(APP, tcp_port, env=env)
            self.pids["https-new"].append(tls.pid)
            self.pids["keep-alive"].append(tcp.pid)
            waits += [(tls_port, tls), (tcp_port, tcp)]
        overlays = [children.start_overlay(APP, env) for env in envs]
        self.overlay = [overlay_info(proc) for proc in overlays]
        self.pids["overlay"] = [proc.pid for proc in overlays]
        for port, proc in waits:
            wait_port(port, proc)


class Mode:
    """One transport: its client, the three stage URLs and what it measured."""

    def __init__(self, name: str, client: httpx.AsyncClient, urls: list[str]) -> None:
        self.name, self.client, self.urls = name, client, urls
        self.latencies: list[float] = []  # seconds per chain
        self.handler_ms: list[float] = []  # the three handlers' own time per chain
        self.client_cpu = self.server_cpu = 0.0

    async def chain(self, index: int) -> None:
        value: object = f"request {index}"
        handler = 0.0
        start = time.perf_counter()
        for url in self.urls:
            r = await self.client.post(url, json={"input": value})
            r.raise_for_status()
            body = r.json()
            value, handler = body["result"], handler + body["handler_ms"]
        self.latencies.append(time.perf_counter() - start)
        self.handler_ms.append(handler)


async def run(args: argparse.Namespace, stages: Stages) -> dict[str, Any]:
    from overlay_httpx import Address, Identity, Node, OverlayTransport

    ctx = ssl.create_default_context(cafile=str(stages.cert_key[1]))
    hosts = [Address.parse(info["address"]).host for info in stages.overlay]
    urls = {
        "https-new": [f"https://127.0.0.1:{p}/v1/infer" for p in stages.tls_ports],
        "keep-alive": [f"http://127.0.0.1:{p}/v1/infer" for p in stages.tcp_ports],
        "overlay": [f"http://{h}/v1/infer" for h in hosts],
    }

    async def clients(stack: AsyncExitStack) -> dict[str, httpx.AsyncClient]:
        """A client per mode; the overlay's on a new node that knows the three stages."""
        node = await stack.enter_async_context(Node(Identity.generate()))
        for info in stages.overlay:
            node.add_peer(info["address"], info["identity"], info["endpoint"])
        made = {
            "https-new": httpx.AsyncClient(
                verify=ctx, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)
            ),
            "keep-alive": httpx.AsyncClient(timeout=60),
            "overlay": httpx.AsyncClient(transport=OverlayTransport(node), timeout=60),
        }
        for client in made.values():
            await stack.enter_async_context(client)
        return made

    # Warm the servers (imports, FastAPI's first-request work) with throw-away clients and
    # a throw-away node, so the measured first chain shows connection and tunnel set-up.
    async with AsyncExitStack() as stack:
        for name, client in (await clients(stack)).items():
            warm = Mode(name, client, urls[name])
            for i in range(args.warmup):
                await warm.chain(-1 - i)

    async with AsyncExitStack() as stack:
        made = await clients(stack)
        modes = {name: Mode(name, made[name], urls[name]) for name in MODES}

        done, turn, last_print = 0, 0, time.monotonic()
        while done < args.requests:
            count = min(args.block, args.requests - done)
            order = MODES[turn % len(MODES) :] + MODES[: turn % len(MODES)]
            for name in order:
                mode = modes[name]
                client_cpu = time.process_time()
                server_cpu = sum(proc_cpu_seconds(pid) for pid in stages.pids[name])
                for i in range(done, done + count):
                    await mode.chain(i)
                mode.client_cpu += time.process_time() - client_cpu
                mode.server_cpu += (
                    sum(proc_cpu_seconds(pid) for pid in stages.pids[name]) - server_cpu
                )
            done, turn = done + count, turn + 1
            if time.monotonic() - last_print > 10 or done == args.requests:
                last_print = time.monotonic()
                means = ", ".join(
                    f"{m.name} {statistics.fmean(m.latencies) * 1e3:.1f} ms" for m in modes.values()
                )
                print(f"chains {done}/{args.requests}: mean {means}", file=sys.stderr, flush=True)

    results = {}
    for name, mode in modes.items():
        lat_ms = [s * 1e3 for s in mode.latencies]
        mean = statistics.fmean(lat_ms)
        calls = len(lat_ms) * STAGES
        overhead = (mean - STAGES * args.compute_ms) / STAGES
        results[name] = {
            "chains": len(lat_ms),
            "total_s": sum(lat_ms) / 1e3,
            "mean_chain_ms": mean,
            "p50_chain_ms": _pct(lat_ms, 0.5),
            "p99_chain_ms": _pct(lat_ms, 0.99),
            "first_chain_ms": lat_ms[0],
            "overhead_ms": overhead,
            "overhead_share": STAGES * overhead / mean,
            "overhead_outside_handler_ms": (mean - statistics.fmean(mode.handler_ms)) / STAGES,
            "client_cpu_us_per_call": mode.client_cpu / calls * 1e6,
            "server_cpu_us_per_call": mode.server_cpu / calls * 1e6,
        }
    return {
        "modes": results,
        "latencies_ms": {n: [s * 1e3 for s in m.latencies] for n, m in modes.items()},
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def table(results: dict[str, dict[str, float]], requests: int) -> str:
    """The article's table, plus the figures behind it; ratios to keep-alive."""
    base = results["keep-alive"]
    https = results["https-new"]
    out = [
        f"| transport | per-request network overhead | {requests:,} chains total "
        "| saved vs per-request HTTPS | mean chain | p99 chain | first chain "
        "| overhead outside the handler | CPU per call, orchestrator + stage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in MODES:
        m = results[name]
        ratio = "" if name == "keep-alive" else f", {m['overhead_ms'] / base['overhead_ms']:.2f}x"
        total_ratio = "" if name == "keep-alive" else f" ({m['total_s'] / base['total_s']:.3f}x)"
        saved = https["total_s"] - m["total_s"]
        out.append(
            f"| {LABELS[name]} "
            f"| {m['overhead_ms']:.2f} ms/req ({m['overhead_share']:.1%}{ratio}) "
            f"| {m['total_s']:.1f} s{total_ratio} "
            f"| {'—' if name == 'https-new' else f'{saved:.1f} s'} "
            f"| {m['mean_chain_ms']:.2f} ms | {m['p99_chain_ms']:.2f} ms "
            f"| {m['first_chain_ms']:.1f} ms "
            f"| {m['overhead_outside_handler_ms']:.2f} ms "
            f"| {m['client_cpu_us_per_call']:.0f} + {m['server_cpu_us_per_call']:.0f} µs |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="chains per mode")
    parser.add_argument("--compute-ms", type=float, default=20.0, help="per stage")
    parser.add_argument("--block", type=int, default=50, help="chains per mode per turn")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured chains per mode")
    parser.add_argument("--quick", action="store_true", help="50 chains per mode")
    parser.add_argument("--json", help="also write the figures (and every latency) here")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.block, args.warmup = 50, 10, 2
    command = " ".join(["benchmarks/bench_chain.py", *sys.argv[1:]])
    started = datetime.datetime.now().isoformat(timespec="seconds")
    machine: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    machine["loadavg"] = os.getloadavg()
    with Children() as children:
        stages = Stages(children, args.compute_ms)
        print(
            f"9 stage servers up; {args.requests} chains x {len(MODES)} modes, "
            f"{args.compute_ms:g} ms compute per stage",
            file=sys.stderr,
            flush=True,
        )
        measured = anyio.run(run, args, stages)
    machine["loadavg_after"] = os.getloadavg()
    print()
    print(table(measured["modes"], args.requests))
    m = measured["modes"]
    print(
        f"\noverlay vs keep-alive: network overhead {m['overlay']['overhead_ms']:.2f} vs "
        f"{m['keep-alive']['overhead_ms']:.2f} ms/req "
        f"({m['overlay']['overhead_ms'] / m['keep-alive']['overhead_ms']:.2f}x); "
        f"vs per-request HTTPS {m['https-new']['overhead_ms']:.2f} ms/req "
        f"({m['overlay']['overhead_ms'] / m['https-new']['overhead_ms']:.2f}x)"
    )
    if args.json:
        settings = {k: getattr(args, k) for k in ("requests", "compute_ms", "block", "warmup")}
        out = {"date": started, "command": command, "settings": settings, "machine": machine}
        Path(args.json).write_text(json.dumps(out | measured, indent=1))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; servers stopped")
