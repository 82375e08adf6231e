"""The same FastAPI app behind four HTTP paths, side by side in one run.

Why: overlay_httpx replaces ordinary HTTP connections between model services, so
the figure that matters is how it compares with what people use today, measured
on the same machine, with the same app, at the same time.

Rows (each server in its own child process, every client in this one; the rows take
turns within each phase, sequential requests in chunks of `--chunk`, and the order
rotates each round):
  * overlay   httpx + OverlayTransport (HTTP/2 over an overlay tunnel) -> serve()
  * tcp       httpx HTTP/1.1 keep-alive over TCP -> uvicorn          (the baseline)
  * tls-new   httpx with a new TLS connection per request -> uvicorn over TLS
  * h2-tls    httpx HTTP/2 over TLS (one connection) -> hypercorn
Measures, per row: sequential small JSON POST p50/p90/p99; requests/s with 64 in
flight; 64 MiB GET MB/s; SSE time to first chunk; CPU per request in the sequential
phase, client (this process, `time.process_time()`) and server (the child,
utime+stime from /proc/<pid>/stat); a new connection per request from a client
already in use (for the overlay a first request to a peer the client has never
talked to, so a new tunnel, handshake included: the server process serves the app
on that many extra nodes); and the first request on a new client (for the overlay
a new node as well). Prints a
markdown table with ratios to the tcp keep-alive row; `--json` writes every figure
and the raw latency samples; `--plot` draws latency distributions and throughput.

Run:  .venv/bin/python benchmarks/bench_http.py --rounds 3 --json h.json --plot h.png
      .venv/bin/python benchmarks/bench_http.py --quick          (smoke run, well under 30 s)
      .venv/bin/python benchmarks/bench_http.py --from-json h.json --plot h.png  (redraw only)
Needs hypercorn (the h2-tls row) and, for --plot, matplotlib.
This machine is shared and noisy: compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx
from _harness import Children, free_port, proc_cpu_seconds, require, self_signed, wait_port
from _harness import machine as harness_machine

PAYLOAD = {"prompt": "hello", "max_tokens": 16}
APP = "_http_app:app"
ROWS = ("overlay", "tcp", "tls-new", "h2-tls")
LABELS = {
    "overlay": "overlay (httpx + OverlayTransport, HTTP/2 over the tunnel)",
    "tcp": "tcp (httpx HTTP/1.1 keep-alive, uvicorn)",
    "tls-new": "tls-new (new TLS connection per request, uvicorn)",
    "h2-tls": "h2-tls (httpx HTTP/2 over TLS, hypercorn)",
}
COLORS = {"overlay": "#d62728", "tcp": "#1f77b4", "tls-new": "#7f7f7f", "h2-tls": "#2ca02c"}


# -- measurements ------------------------------------------------------------------------


async def timed_post(client: httpx.AsyncClient, url: str = "/v1/echo") -> float:
    """Seconds for one small JSON POST, which must succeed."""
    start = time.perf_counter()
    (await client.post(url, json=PAYLOAD)).raise_for_status()
    return time.perf_counter() - start


async def sequential(client: httpx.AsyncClient, count: int) -> list[float]:
    return [await timed_post(client) for _ in range(count)]


async def in_flight(client: httpx.AsyncClient, workers: int, per_worker: int) -> float:
    async def worker() -> None:
        for _ in range(per_worker):
            (await client.post("/v1/echo", json=PAYLOAD)).raise_for_status()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker)
    return workers * per_worker / (time.perf_counter() - start)


async def bulk(client: httpx.AsyncClient, mib: int) -> float:
    start = time.perf_counter()
    total = 0
    async with client.stream("GET", f"/bytes/{mib}") as r:
        async for chunk in r.aiter_raw():
            total += len(chunk)
    assert total == mib << 20, total
    return total / (time.perf_counter() - start) / 1e6


async def sse_first_chunk(client: httpx.AsyncClient, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        async with client.stream("GET", "/sse") as r:
            async for _chunk in r.aiter_raw():
                samples.append(time.perf_counter() - start)
                break
    return samples


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


class Cpu:
    """CPU seconds spent by this process and by one server process over a phase."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.client = time.process_time()
        self.server = proc_cpu_seconds(server_pid)

    def per_request_us(self, count: int) -> tuple[float, float]:
        client = time.process_time() - self.client
        server = proc_cpu_seconds(self.pid) - self.server
        return client / count * 1e6, server / count * 1e6


# -- servers -------------------------------------------------------------------------------


class Servers:
    """One child per row: serve() on a node, uvicorn over TCP and TLS, hypercorn over TLS."""

    def __init__(self, children: Children, new_peers: int = 0) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_http_"))
        tls = self_signed(tmp)
        self.cert = tls[1]
        self.tcp_port, self.tls_port, self.h2_port = free_port(), free_port(), free_port()
        tcp = children.uvicorn(APP, self.tcp_port)
        tls_new = children.uvicorn(APP, self.tls_port, tls)
        h2 = children.hypercorn(APP, self.h2_port, tls)
        overlay, self.overlay = children.overlay(APP, peers=new_peers)
        wait_port(self.tcp_port, tcp)
        wait_port(self.tls_port, tls_new)
        wait_port(self.h2_port, h2)
        self.pids = {"overlay": overlay.pid, "tcp": tcp.pid, "tls-new": tls_new.pid}
        self.pids["h2-tls"] = h2.pid


async def run(args: argparse.Namespace, servers: Servers) -> dict[str, Any]:
    from overlay_httpx import Address, Identity, Node, OverlayTransport, PublicIdentity

    info = servers.overlay
    server_identity = PublicIdentity.parse(info["identity"])
    rounds: dict[str, dict[str, list[float]]] = {row: {} for row in ROWS}
    samples: dict[str, list[float]] = {row: [] for row in ROWS}

    def record(row: str, metric: str, value: float) -> None:
        rounds[row].setdefault(metric, []).append(value)

    # httpx (httpcore) sets ALPN on the context it is given: one context per row.
    def tls_context() -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(servers.cert))

    tls_new_ctx, h2_ctx = tls_context(), tls_context()

    async with Node(Identity.generate()) as node:
        node.add_peer(info["address"], server_identity, info["endpoint"])
        host = f"http://{node.peers()[0].address.host}"

        def overlay_client(on: Node) -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=OverlayTransport(on), base_url=host, timeout=60)

        clients: dict[str, Callable[[], httpx.AsyncClient]] = {
            "overlay": lambda: overlay_client(node),
            "tcp": lambda: httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{servers.tcp_port}", timeout=60
            ),
            "tls-new": lambda: httpx.AsyncClient(
                base_url=f"https://127.0.0.1:{servers.tls_port}",
                verify=tls_new_ctx,
                timeout=60,
                limits=httpx.Limits(max_keepalive_connections=0),
            ),
            "h2-tls": lambda: httpx.AsyncClient(
                base_url=f"https://127.0.0.1:{servers.h2_port}",
                verify=h2_ctx,
                http2=True,
                timeout=60,
            ),
        }

        # A new connection for every request, on a client already in use: the tls-new
        # row's own client, and the same for the other rows. The overlay's counterpart
        # is a first request to a peer this client has never talked to (a new tunnel:
        # handshake and HTTP/2 preface), one of the server process's extra nodes.
        one_shot = httpx.Limits(max_keepalive_connections=0)
        renewing: dict[str, Callable[[], httpx.AsyncClient]] = {
            "tcp": lambda: httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{servers.tcp_port}", timeout=60, limits=one_shot
            ),
            "tls-new": clients["tls-new"],
            "h2-tls": lambda: httpx.AsyncClient(
                base_url=f"https://127.0.0.1:{servers.h2_port}",
                verify=h2_ctx,
                http2=True,
                timeout=60,
                limits=one_shot,
            ),
        }
        new_peers = iter(info["peers"])

        async def new_connection(row: str, client: httpx.AsyncClient, client_node: Node) -> float:
            url = "/v1/echo"
            if row == "overlay":
                peer = next(new_peers)
                client_node.add_peer(peer["address"], peer["identity"], peer["endpoint"])
                url = f"http://{Address.parse(peer['address']).host}/v1/echo"
            return await timed_post(client, url)

        async def first_request(row: str) -> float:
            """One request on a new client: a new connection (overlay: a new node and tunnel).

            Client construction (httpx loads its default CA bundle there) and node start-up
            are outside the timer; connection set-up (TCP, TLS, the tunnel handshake, the
            HTTP/2 preface) and the request are inside it.
            """
            async with AsyncExitStack() as stack:
                if row == "overlay":
                    fresh = await stack.enter_async_context(Node(Identity.generate()))
                    fresh.add_peer(info["address"], server_identity, info["endpoint"])
                    client = await stack.enter_async_context(overlay_client(fresh))
                else:
                    client = await stack.enter_async_context(clients[row]())
                return await timed_post(client)

        for round_ in range(args.rounds):
            order = ROWS[round_ % len(ROWS) :] + ROWS[: round_ % len(ROWS)]
            async with AsyncExitStack() as stack:
                open_ = {row: await stack.enter_async_context(clients[row]()) for row in order}
                # The overlay's renewing client gets a node of its own, closed with the
                # round, so that the tunnels it opens do not linger in the other phases.
                client_node = await stack.enter_async_context(Node(Identity.generate()))
                client_node.add_peer(info["address"], server_identity, info["endpoint"])
                renew = {
                    row: await stack.enter_async_context(
                        overlay_client(client_node) if row == "overlay" else renewing[row]()
                    )
                    for row in order
                }
                for row in order:
                    for client in (open_[row], renew[row]):
                        r = await client.post("/v1/echo", json=PAYLOAD)
                        if row == "h2-tls" and r.http_version != "HTTP/2":
                            raise RuntimeError(f"h2-tls row negotiated {r.http_version}")
                        await sequential(client, args.warmup)
                # Sequential requests in chunks, the rows taking turns, so that a burst of
                # load on this shared machine hits every row alike.
                seq: dict[str, list[float]] = {row: [] for row in order}
                cpu_us = {row: [0.0, 0.0] for row in order}
                for first in range(0, args.requests, args.chunk):
                    count = min(args.chunk, args.requests - first)
                    for row, client in open_.items():
                        cpu = Cpu(servers.pids[row])
                        seq[row] += await sequential(client, count)
                        for i, us in enumerate(cpu.per_request_us(args.requests)):
                            cpu_us[row][i] += us
                for row in order:
                    samples[row] += [s * 1e6 for s in seq[row]]
                    for q, name in ((0.5, "p50_us"), (0.9, "p90_us"), (0.99, "p99_us")):
                        record(row, name, _pct(seq[row], q))
                    record(row, "client_cpu_us", cpu_us[row][0])
                    record(row, "server_cpu_us", cpu_us[row][1])
                for row, client in open_.items():
                    cpu = Cpu(servers.pids[row])
                    record(row, "rps_64", await in_flight(client, 64, args.per_worker))
                    client_us, server_us = cpu.per_request_us(64 * args.per_worker)
                    record(row, "client_cpu_us_64", client_us)
                    record(row, "server_cpu_us_64", server_us)
                for row, client in open_.items():
                    record(row, "get_MBps", await bulk(client, args.mib))
                for row, client in open_.items():
                    sse = await sse_first_chunk(client, args.sse)
                    record(row, "sse_first_us", _pct(sse, 0.5))
                # One request per row in turn: how fast this machine runs depends on
                # how busy it has just been, so rows compared must share each moment.
                renewed: dict[str, list[float]] = {row: [] for row in order}
                for _ in range(args.cold):
                    for row, client in renew.items():
                        renewed[row].append(await new_connection(row, client, client_node))
                for row in order:
                    record(row, "new_conn_us", _pct(renewed[row], 0.5))
            firsts: dict[str, list[float]] = {row: [] for row in order}
            for _ in range(args.cold):
                for row in order:
                    firsts[row].append(await first_request(row))
            for row in ROWS:
                record(row, "first_us", statistics.median(firsts[row]) * 1e6)
                m = {k: v[-1] for k, v in rounds[row].items()}
                print(
                    f"round {round_ + 1}/{args.rounds} {row:8}: p50 {m['p50_us']:.0f} µs, "
                    f"{m['rps_64']:.0f} req/s, {m['get_MBps']:.0f} MB/s, "
                    f"CPU/req {m['client_cpu_us']:.0f}+{m['server_cpu_us']:.0f} µs",
                    file=sys.stderr,
                    flush=True,
                )
    summary = {row: {k: statistics.median(v) for k, v in m.items()} for row, m in rounds.items()}
    return {"rows": summary, "rounds": rounds, "samples_us": samples}


# -- report --------------------------------------------------------------------------------

# (metric, column heading, format, higher is better)
COLUMNS: list[tuple[str, str, str, bool]] = [
    ("p50_us", "p50 µs", "{:.0f}", False),
    ("p90_us", "p90 µs", "{:.0f}", False),
    ("p99_us", "p99 µs", "{:.0f}", False),
    ("rps_64", "req/s, 64 in flight", "{:.0f}", True),
    ("get_MBps", "64 MiB GET MB/s", "{:.0f}", True),
    ("sse_first_us", "SSE first chunk µs", "{:.0f}", False),
    ("client_cpu_us", "client CPU µs/req", "{:.0f}", False),
    ("server_cpu_us", "server CPU µs/req", "{:.0f}", False),
    ("new_conn_us", "new connection per request (overlay: new peer) µs", "{:.0f}", False),
    ("first_us", "first request, new client µs", "{:.0f}", False),
]


def table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown: every figure with its ratio to the tcp keep-alive row."""
    base = rows["tcp"]
    out = ["| row | " + " | ".join(c[1] for c in COLUMNS) + " |"]
    out.append("|---" * (len(COLUMNS) + 1) + "|")
    for row in ROWS:
        cells = []
        for metric, _, fmt, _ in COLUMNS:
            if metric not in rows[row]:  # a figure older runs did not measure
                cells.append("n/a")
                continue
            value = rows[row][metric]
            cell = fmt.format(value)
            if row != "tcp" and base[metric] > 0:
                cell += f" ({value / base[metric]:.2f}x)"
            cells.append(cell)
        out.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def targets(s: dict[str, dict[str, float]]) -> str:
    o, base, nan = s["overlay"], s["tcp"], float("nan")
    lines = [
        "overlay, ratios to tcp keep-alive (targets in brackets):",
        f"  p50 latency      {o['p50_us'] / base['p50_us']:.2f}x  [<= 1.0x]",
        f"  64 in flight     {o['rps_64'] / base['rps_64']:.2f}x  [>= 1.5x]",
        f"  64 MiB GET       {o['get_MBps'] / base['get_MBps']:.2f}x  [>= 0.3x]",
        f"  SSE first chunk  {o['sse_first_us'] / base['sse_first_us']:.2f}x  [<= 1.0x]",
        f"  cold: first request to a new peer {o.get('new_conn_us', nan):.0f} µs vs a new "
        f"TLS connection per request {s['tls-new'].get('new_conn_us', nan):.0f} µs  [below]",
        f"    (tls-new p50 in the sequential phase {s['tls-new']['p50_us']:.0f} µs; "
        f"on a new client, and for the overlay a new node: {o['first_us']:.0f} µs "
        f"vs {s['tls-new']['first_us']:.0f} µs)",
        f"overlay vs h2-tls (HTTP/2 over TLS): p50 {o['p50_us'] / s['h2-tls']['p50_us']:.2f}x, "
        f"64 in flight {o['rps_64'] / s['h2-tls']['rps_64']:.2f}x, "
        f"64 MiB GET {o['get_MBps'] / s['h2-tls']['get_MBps']:.2f}x",
    ]
    return "\n".join(lines)


def plot(out: dict[str, Any], path: str) -> None:
    """Two panels: sequential latency CDFs per row, and throughput bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows, samples = out["rows"], out["samples_us"]
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.2, 1]})
    for row in ROWS:
        xs = sorted(s / 1000 for s in samples[row])
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        lat.step(xs, ys, where="post", color=COLORS[row], lw=2 if row == "overlay" else 1.5)
        lat.plot([], [], color=COLORS[row], label=f"{row}  p50 {rows[row]['p50_us'] / 1000:.2f} ms")
    lat.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    lat.xaxis.set_major_formatter(plain)
    lat.xaxis.set_minor_formatter(
        matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else "")
    )
    lat.set_xlabel("sequential small JSON POST latency, ms (log scale)")
    lat.set_ylabel("fraction of requests")
    lat.axhline(0.5, color="0.8", lw=0.8, zorder=0)
    lat.axhline(0.99, color="0.8", lw=0.8, zorder=0)
    lat.set_ylim(0, 1.01)
    lat.grid(True, which="both", axis="x", color="0.92")
    lat.legend(loc="lower right", fontsize=9)
    lat.set_title("Latency, one request at a time (CDF)")

    width = 0.38
    slots = range(len(ROWS))
    rps = [rows[r]["rps_64"] for r in ROWS]
    mbps = [rows[r]["get_MBps"] for r in ROWS]
    bars1 = thr.bar([x - width / 2 for x in slots], rps, width, color=[COLORS[r] for r in ROWS])
    thr.set_ylabel("requests/s with 64 in flight (solid)")
    thr2 = thr.twinx()
    bars2 = thr2.bar(
        [x + width / 2 for x in slots],
        mbps,
        width,
        color="white",
        edgecolor=[COLORS[r] for r in ROWS],
        hatch="//",
        lw=1.5,
    )
    thr2.set_ylabel("64 MiB GET, MB/s (hatched)")
    thr.bar_label(bars1, fmt="%.0f", fontsize=8)
    thr2.bar_label(bars2, fmt="%.0f", fontsize=8)
    thr.set_ylim(0, max(rps) * 1.15)
    thr2.set_ylim(0, max(mbps) * 1.15)
    thr.set_xticks(list(slots), list(ROWS))
    thr.set_title("Throughput (higher is better)")
    core = out.get("machine", {}).get("tunnel_core", "").split(" (")[0]
    core = f", {core} tunnel core" if core else ""
    fig.suptitle(
        f"Same FastAPI app, four HTTP paths, {out.get('date', '').replace('T', ' ')}{core} "
        "(shared 2-core machine: compare ratios)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=500, help="sequential, per round")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=50, help="sequential requests per turn")
    parser.add_argument("--per-worker", type=int, default=20, help="x 64 workers in flight")
    parser.add_argument("--mib", type=int, default=64, help="size of the bulk GET")
    parser.add_argument("--sse", type=int, default=50, help="SSE streams opened per round")
    parser.add_argument(
        "--cold", type=int, default=30, help="new-connection and first requests per round and row"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--json", help="also write the figures (and raw samples) to this file")
    parser.add_argument("--plot", help="draw latency and throughput to this PNG (matplotlib)")
    parser.add_argument("--from-json", help="do not measure: report (and plot) this JSON file")
    args = parser.parse_args()
    for name in ("rounds", "requests", "chunk", "per_worker", "mib", "sse", "cold"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if args.plot:
        require("matplotlib", "needed for --plot")
    if args.from_json:
        out = json.loads(Path(args.from_json).read_text())
    else:
        require("hypercorn", "needed for the HTTP/2-over-TLS row")
        if args.quick:
            args.rounds, args.requests, args.warmup, args.per_worker = 1, 100, 10, 4
            args.mib, args.sse, args.cold = 4, 10, 2
        command = " ".join(["benchmarks/bench_http.py", *sys.argv[1:]])
        started = datetime.datetime.now().isoformat(timespec="seconds")
        machine = harness_machine(
            ("overlay_httpx", "httpx", "h2", "uvicorn", "hypercorn", "fastapi")
        )
        with Children() as children:
            servers = Servers(children, new_peers=args.rounds * args.cold)
            if servers.overlay["tunnel_core"] != machine["tunnel_core"]:
                raise RuntimeError(
                    f"the overlay server runs the {servers.overlay['tunnel_core']} tunnel "
                    f"core, this client the {machine['tunnel_core']}: measure one build"
                )
            print(
                f"servers up; measuring. overlay_httpx tunnel core: {machine['tunnel_core']}",
                file=sys.stderr,
                flush=True,
            )
            measured = anyio.run(run, args, servers)
        machine["loadavg_after"] = os.getloadavg()
        settings = {k: getattr(args, k) for k in ("rounds", "requests", "warmup", "chunk")}
        settings["per_worker"] = args.per_worker
        settings |= {k: getattr(args, k) for k in ("mib", "sse", "cold", "quick")}
        out = {"date": started, "command": command, "settings": settings, "machine": machine}
        out |= measured
    print()
    print(table(out["rows"]))
    print()
    print(targets(out["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(out, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; servers stopped")
