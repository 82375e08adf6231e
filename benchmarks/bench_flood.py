"""A handshake flood against a serving node: its CPU, an established tunnel's latency, memory.

Why: docs/SECURITY.md claims that a flood of valid initiations (fresh keys, then
replays, from many source ports) cannot exhaust a node: past `handshake_rate_limit`
(200/s) initiations without a cookie get a small COOKIE reply and no Diffie-Hellman
work, and what the flood made (unconfirmed handshakes, replay timestamps, session
indexes) is forgotten after `handshake_timeout`. The unit tests check this on a
virtual clock; this benchmark gives the figures for docs/RELIABILITY.md on real UDP
sockets: how much CPU the node burns, what happens to the latency of a tunnel that
was already established, and whether the node's tables and memory come back down.

Three processes (the children die with this one, PR_SET_PDEATHSIG, and stop when their
stdin closes):
  * server   `bench_flood.py --serve`: a Node on 127.0.0.1 (TunnelConfig defaults but
             `--handshake-timeout`) serving a plain ASGI app with `serve()`:
             `POST /echo` returns the body, `GET /stats` returns the node's statistics
             (drops by reason, tunnels, handshakes), the endpoint's table sizes, cookies
             sent, initiations that got Diffie-Hellman work, its socket's kernel queue
             and drops (/proc/net/udp), the event loop's worst lag, RSS, live Python
             blocks (after a gc), CPU seconds and time spent waiting for a CPU, and
             a time series (every 50 ms: tunnels, datagrams received, socket queue);
  * flooder  `bench_flood.py --flooder`: pre-generates `--keys` valid initiations from
             fresh keys to the server's key, then sends them round robin (fresh keys,
             then replays) from `--sockets` UDP sockets at `--rate` datagrams/s;
  * client   (this process): a Node and httpx.AsyncClient(transport=OverlayTransport)
             sending sequential small `POST /echo` through the phases: baseline, flood
             (from "go" until the flooder reports it stopped), after; then it waits
             `handshake_timeout` + 1 s and reads /stats again (settled). `--repeat N`
             runs N flood/after/settled cycles on the same server: RSS that stays put
             from one cycle to the next is the allocator keeping its pages, not a leak.

The report: per phase, latency percentiles with ratios to the baseline; the server's
CPU (difference of its CPU seconds between the /stats calls at the phase edges divided
by the server's own wall clock between them: 1.0 = one core busy) and the share of that
time it was runnable but waiting for a CPU (/proc/self/schedstat; high means the machine,
not the node, was the limit); the tunnel's packets lost (client side); the server's
worst event-loop lag, fullest socket queue and kernel drops. Per flood: datagrams sent
and the rate achieved, how many the node got to handle, cookies sent, initiations that
got Diffie-Hellman work (answered or found to be stale replays). Table sizes, live
Python blocks and RSS at every phase edge. `--json` writes all of it, raw latencies too.

Run:  .venv/bin/python benchmarks/bench_flood.py [--rate 50000] [--json flood.json]
      .venv/bin/python benchmarks/bench_flood.py --rate 0      (flood as fast as possible)
      .venv/bin/python benchmarks/bench_flood.py --repeat 3    (does memory keep growing?)
      .venv/bin/python benchmarks/bench_flood.py --quick       (smoke run, well under 30 s)
This machine is shared and noisy (2 cores for three processes): compare the flood
phase with the baseline of the same run (the ratios), not figures across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
from _harness import Children
from _harness import machine as harness_machine
from _soak_common import repo_root

sys.path.insert(0, str(repo_root()))
from examples.pipeline.common import stdin_eof

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY = b"x" * 64
PROBE_INTERVAL = 0.05  # seconds between the server's samples of its socket queue and loop lag
_PR_SET_PDEATHSIG = 1


# -- the server child ----------------------------------------------------------------------


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of this process, in KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def run_queue_wait_s() -> float:
    """Seconds this process's main thread has spent runnable but waiting for a CPU."""
    return int(Path("/proc/self/schedstat").read_text().split()[1]) / 1e9


class Probe:
    """Samples the node's UDP socket (kernel queue, kernel drops) and the event loop's lag.

    Every sample also goes into `series` (time, tunnels, datagrams the endpoint has
    received, socket queue bytes), so a run's JSON shows how they moved within a phase.
    """

    def __init__(self, node: Any) -> None:
        port = node.endpoint[1]
        self._local = f"0100007F:{port:04X}"  # 127.0.0.1:port as /proc/net/udp writes it
        self._endpoint = node._endpoint
        self.max_queue = 0
        self.max_lag = 0.0
        self.series: list[tuple[float, int, int, int]] = []

    def socket(self) -> tuple[int, int]:
        """(bytes waiting in the socket's receive queue, datagrams the kernel dropped)."""
        with open("/proc/net/udp") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 12 and fields[1] == self._local:
                    return int(fields[4].split(":")[1], 16), int(fields[-1])
        return 0, 0

    async def run(self) -> None:
        while True:
            start = anyio.current_time()
            await anyio.sleep(PROBE_INTERVAL)
            self.max_lag = max(self.max_lag, anyio.current_time() - start - PROBE_INTERVAL)
            queue = self.socket()[0]
            self.max_queue = max(self.max_queue, queue)
            endpoint = self._endpoint
            sample = (time.monotonic(), len(endpoint._tunnels), endpoint._received, queue)
            self.series.append(sample)

    def take(self) -> dict[str, Any]:
        """The worst queue and lag and the samples since the last call, then start again."""
        queue, drops = self.socket()
        out = {"max_queue_bytes": max(self.max_queue, queue), "max_loop_lag_s": self.max_lag}
        out |= {"queue_bytes": queue, "kernel_drops": drops, "series": self.series}
        self.max_queue, self.max_lag, self.series = 0, 0.0, []
        return out


def stats_of(node: Any, probe: Probe) -> dict[str, Any]:
    endpoint = node._endpoint
    stats = node.statistics()
    states: dict[str, int] = {}
    for tunnel in stats.tunnels:
        states[tunnel.state] = states.get(tunnel.state, 0) + 1
    out: dict[str, Any] = {"t": time.monotonic(), "cpu_s": time.process_time()}
    out["wait_s"] = run_queue_wait_s()
    gc.collect()  # after the CPU reading, so that "Python blocks" counts live objects only
    status = _proc_status()
    out |= {"rss_kib": status["VmRSS"], "hwm_kib": status["VmHWM"]}
    out |= {
        "drops": stats.drops,
        "send_errors": stats.send_errors,
        "datagrams_received": stats.datagrams_received,
        "datagrams_sent": stats.datagrams_sent,
        "receive_buffer": stats.receive_buffer,
        "tunnels": len(stats.tunnels),
        "tunnel_states": states,
        "handshakes": sum(t.handshakes for t in stats.tunnels),
        "streams": stats.streams,
        "accepted_timestamps": len(endpoint._accepted_timestamps),
        "indexes": len(endpoint._indexes),
        "cookie_sources": len(endpoint.cookies._sources),
        "cookies_sent": endpoint.cookies.cookies_sent,
        "dh": endpoint.cookies.handshakes_computed,
        "allocated_blocks": sys.getallocatedblocks(),
    }
    return out | probe.take()


def make_app(node: Any, probe: Probe) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        route = (scope["method"], scope["path"])
        if route == ("POST", "/echo"):
            status, kind = 200, b"application/octet-stream"
        elif route == ("GET", "/stats"):
            status, kind = 200, b"application/json"
            body = json.dumps(stats_of(node, probe)).encode()
        else:
            status, kind, body = 404, b"text/plain", b"not found"
        headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


async def _serve(handshake_timeout: float) -> None:
    from overlay_httpx import Identity, Node, serve

    async with (
        Node(Identity.generate(), handshake_timeout=handshake_timeout) as node,
        anyio.create_task_group() as tg,
    ):
        probe = Probe(node)
        tg.start_soon(probe.run)
        app = make_app(node, probe)
        await tg.start(functools.partial(serve, app, node, lifespan="off"))
        info = {"address": str(node.address), "identity": str(node.public)}
        info |= {"endpoint": "{}:{}".format(*node.endpoint), "pid": os.getpid()}
        print(json.dumps(info), flush=True)
        await stdin_eof()
        tg.cancel_scope.cancel()


# -- the flooder child ---------------------------------------------------------------------


def initiations(target: str, count: int) -> list[bytes]:
    """Valid initiations from `count` fresh keys: each passes mac1 and is worth a DH."""
    from overlay_httpx import Address, Identity, PublicIdentity
    from overlay_httpx._protocol._endpoint import Endpoint

    public = PublicIdentity.parse(target)
    out = []
    for i in range(count):
        attacker = Endpoint(Identity.generate(), Address(1, 5000 + i), timestamp_origin_ns=1)
        attacker.connect(public, ("127.0.0.1", 9), 0.0)
        [(init, _)] = attacker.datagrams_to_send(0.0)
        out.append(init)
    return out


def flood(
    inits: list[bytes],
    socks: list[socket.socket],
    target: tuple[str, int],
    seconds: float,
    rate: int,
) -> dict[str, Any]:
    """Send `inits` round robin for `seconds` at `rate` datagrams/s (0: as fast as possible)."""
    errors: dict[str, int] = {}
    sent = 0
    cpu = time.process_time()
    start = time.perf_counter()
    end = start + seconds
    while (now := time.perf_counter()) < end:
        if rate > 0:
            due = int((now - start) * rate) - sent
            if due <= 0:
                time.sleep(0.0005)  # pacing: the next datagrams are not due yet
                continue
            count = min(due, 1024)
        else:
            count = 1024
        for i in range(sent, sent + count):
            try:
                socks[i % len(socks)].sendto(inits[i % len(inits)], target)
            except OSError as exc:
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
        sent += count
    elapsed = time.perf_counter() - start
    attempted = sent
    sent -= sum(errors.values())
    return {
        "sent": sent,
        "attempted": attempted,
        "seconds": elapsed,
        "rate": sent / elapsed,
        "cpu_fraction": (time.process_time() - cpu) / elapsed,
        "send_errors": errors,
    }


def _flooder(target_identity: str, endpoint: str, keys: int, sockets: int, rate: int) -> None:
    host, _, port = endpoint.rpartition(":")
    target = (host, int(port))
    start = time.perf_counter()
    inits = initiations(target_identity, keys)
    socks = []
    for _ in range(sockets):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        socks.append(sock)
    ready = {"keys": len(inits), "init_bytes": len(inits[0]), "sockets": len(socks)}
    print(json.dumps(ready | {"generate_s": time.perf_counter() - start}), flush=True)
    for line in sys.stdin:  # "go SECONDS" for each flood, until the parent closes stdin
        command = line.split()
        if command[:1] == ["go"]:
            print(json.dumps(flood(inits, socks, target, float(command[1]), rate)), flush=True)
    for sock in socks:
        sock.close()


# -- the client (this process) -------------------------------------------------------------


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the stdin lifeline still works
        pass


def spawn(children: Children, args: list[str]) -> subprocess.Popen[bytes]:
    """This script in `args` mode as a child with piped stdin (its lifeline) and stdout."""
    proc = subprocess.Popen(
        [sys.executable, __file__, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        preexec_fn=_die_with_parent,  # only prctl() between fork and exec
    )
    children.procs.append(proc)
    return proc


def read_line(proc: subprocess.Popen[bytes], what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the {what} exited with {proc.wait()}")
    return json.loads(line)  # type: ignore[no-any-return]


def _pct(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Phase:
    """Sequential POST /echo until told to stop; latencies in µs, failures by type."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.samples_us: list[float] = []
        self.errors: dict[str, int] = {}
        self.wall = time.perf_counter()
        self.cpu = time.process_time()
        self.wait = run_queue_wait_s()

    async def run(
        self, client: httpx.AsyncClient, done: Callable[[], bool], interval: float
    ) -> None:
        while not done():
            start = time.perf_counter()
            try:
                r = await client.post("/echo", content=BODY)
                r.raise_for_status()
                if r.content != BODY:
                    raise RuntimeError(f"echo returned {len(r.content)} bytes")
            except (httpx.HTTPError, RuntimeError) as exc:
                name = type(exc).__name__
                self.errors[name] = self.errors.get(name, 0) + 1
            else:
                self.samples_us.append((time.perf_counter() - start) * 1e6)
            if interval > 0:
                await anyio.sleep(interval)  # pacing between requests

    def end(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall
        s = self.samples_us
        out: dict[str, Any] = {"seconds": wall, "requests": len(s), "errors": self.errors}
        for q, key in ((0.5, "p50_us"), (0.9, "p90_us"), (0.99, "p99_us")):
            out[key] = _pct(s, q)
        out["max_us"] = max(s) if s else None
        out["client_cpu"] = (time.process_time() - self.cpu) / wall
        out["client_wait"] = (run_queue_wait_s() - self.wait) / wall
        out["samples_us"] = s
        return out


def _delta(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    return int(after.get("drops", {}).get(key, 0) - before.get("drops", {}).get(key, 0))


def between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the server did between two /stats snapshots."""
    wall = after["t"] - before["t"]
    reasons = set(before["drops"]) | set(after["drops"])
    drops = {r: _delta(before, after, r) for r in sorted(reasons)}
    return {
        "server_seconds": wall,
        "server_cpu": (after["cpu_s"] - before["cpu_s"]) / wall,
        "server_wait": (after["wait_s"] - before["wait_s"]) / wall,
        "max_loop_lag_s": after["max_loop_lag_s"],
        "max_queue_bytes": after["max_queue_bytes"],
        "kernel_drops": after["kernel_drops"] - before["kernel_drops"],
        "datagrams_received": after["datagrams_received"] - before["datagrams_received"],
        "cookies_sent": after["cookies_sent"] - before["cookies_sent"],
        "dh": after["dh"] - before["dh"],
        "drops": {r: n for r, n in drops.items() if n},
        "client_tunnel": {
            k: after["client_tunnel"][k] - before["client_tunnel"][k]
            for k in ("packets_sent", "packets_lost", "frames_retransmitted", "handshakes")
        },
    }


def cycle_names(repeat: int, k: int) -> tuple[str, str, str]:
    """The flood, after and settled names of flood cycle `k` (1-based)."""
    suffix = "" if repeat == 1 else f" {k}"
    return f"flood{suffix}", f"after{suffix}", f"settled{suffix}"


async def measure(
    args: argparse.Namespace, info: dict[str, Any], flooder: subprocess.Popen[bytes]
) -> dict[str, Any]:
    from overlay_httpx import Address, Identity, Node, OverlayTransport, PublicIdentity

    edges: dict[str, dict[str, Any]] = {}
    phases: dict[str, dict[str, Any]] = {}
    floods: dict[str, dict[str, Any]] = {}
    spans: list[tuple[str, str]] = []  # (phase, the edge it starts from)
    async with Node(Identity.generate()) as node:
        node.add_peer(info["address"], PublicIdentity.parse(info["identity"]), info["endpoint"])
        base = f"http://{Address.parse(info['address']).host}"
        transport = OverlayTransport(node)
        async with httpx.AsyncClient(transport=transport, base_url=base, timeout=args.timeout) as c:

            async def stats() -> dict[str, Any]:
                """The server's /stats, plus this side's view of the tunnel."""
                r = await c.get("/stats")
                r.raise_for_status()
                out: dict[str, Any] = r.json()
                [tunnel] = node.statistics().tunnels
                out["client_tunnel"] = {
                    "packets_sent": tunnel.packets_sent,
                    "packets_lost": tunnel.packets_lost,
                    "frames_retransmitted": tunnel.frames_retransmitted,
                    "smoothed_rtt": tunnel.smoothed_rtt,
                    "handshakes": tunnel.handshakes,
                }
                return out

            async def timed(name: str, seconds: float) -> None:
                phase = Phase(name)
                deadline = time.perf_counter() + seconds
                await phase.run(c, lambda: time.perf_counter() >= deadline, args.interval)
                phases[name] = phase.end()

            async def flooded(name: str) -> None:
                """Requests from "go" until the flooder says it has stopped."""
                assert flooder.stdin is not None
                flooder.stdin.write(f"go {args.flood}\n".encode())
                flooder.stdin.flush()
                stopped = anyio.Event()

                async def wait_flooder() -> None:
                    floods[name] = await anyio.to_thread.run_sync(read_line, flooder, "flooder")
                    stopped.set()

                phase = Phase(name)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait_flooder)
                    await phase.run(c, stopped.is_set, args.interval)
                phases[name] = phase.end()

            for _ in range(args.warmup):
                (await c.post("/echo", content=BODY)).raise_for_status()
            edges["start"] = await stats()
            await timed("baseline", args.baseline)
            edges["baseline"] = await stats()
            spans.append(("baseline", "start"))
            previous = "baseline"
            for k in range(1, args.repeat + 1):
                flood_name, after_name, settled_name = cycle_names(args.repeat, k)
                await flooded(flood_name)
                edges[flood_name] = await stats()
                await timed(after_name, args.after)
                edges[after_name] = await stats()
                await anyio.sleep(args.handshake_timeout + 1.0)  # unconfirmed handshakes expire
                edges[settled_name] = await stats()
                spans += [(flood_name, previous), (after_name, flood_name)]
                previous = settled_name
    for name, start in spans:
        phases[name] |= between(edges[start], edges[name])
    return {"phases": phases, "edges": edges, "flooder": floods}


# -- report --------------------------------------------------------------------------------


def _us(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def _ratio(value: float | None, base: float | None) -> str:
    return "" if value is None or not base else f" ({value / base:.2f}x)"


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return "\n".join(out + ["| " + " | ".join(row) + " |" for row in rows])


def phase_table(phases: dict[str, dict[str, Any]]) -> str:
    """Per phase: latency (ratios to the baseline), CPU, losses, the server's socket."""
    base = phases["baseline"]
    head = ["phase", "s", "requests", "errors", "p50 µs", "p90 µs", "p99 µs", "max µs"]
    head += ["server CPU (cores)", "server waiting for a CPU", "client CPU", "client waiting"]
    head += ["tunnel packets lost / sent", "server loop lag max ms", "socket queue max KiB"]
    head += ["kernel drops"]
    rows = []
    for name, p in phases.items():
        mine = name != "baseline"
        row = [name, f"{p['seconds']:.1f}", str(p["requests"]), str(sum(p["errors"].values()))]
        for key in ("p50_us", "p90_us", "p99_us", "max_us"):
            row.append(_us(p[key]) + (_ratio(p[key], base[key]) if mine else ""))
        cpu = f"{p['server_cpu']:.2f}"
        row.append(cpu + (_ratio(p["server_cpu"], base["server_cpu"]) if mine else ""))
        row += [f"{p['server_wait']:.2f}", f"{p['client_cpu']:.2f}", f"{p['client_wait']:.2f}"]
        tunnel = p["client_tunnel"]
        row.append(f"{tunnel['packets_lost']} / {tunnel['packets_sent']}")
        row.append(f"{p['max_loop_lag_s'] * 1e3:.1f}")
        row.append(f"{p['max_queue_bytes'] / 1024:.0f}")
        row.append(str(p["kernel_drops"]))
        rows.append(row)
    return _table(head, rows)


def flood_figures(out: dict[str, Any], name: str) -> dict[str, Any]:
    """What one flood sent, and what the server did with it."""
    f, p = out["flooder"][name], out["phases"][name]
    drops = p["drops"]
    handled = drops.get("cookie_required", 0) + drops.get("handshake_rate_limited", 0)
    handled += p["dh"] + drops.get("bad_mac", 0)
    unanswered = ("stale_timestamp", "auth_failure", "trust_pending", "simultaneous_initiation")
    return {
        "sent": f["sent"],
        "rate": f["rate"],
        "flooder_cpu": f["cpu_fraction"],
        "handled": handled,
        "cookies": p["cookies_sent"],
        "dh": p["dh"],
        "dh_per_s": p["dh"] / p["server_seconds"],
        "answered": p["dh"] - sum(drops.get(r, 0) for r in unanswered),
        "stale": drops.get("stale_timestamp", 0),
        "rate_limited": drops.get("handshake_rate_limited", 0),
    }


def flood_table(out: dict[str, Any]) -> str:
    from overlay_httpx._protocol._cookies import COOKIE_SIZE

    head = ["flood", "sent", "sent/s", "flooder CPU", "INITs the node handled"]
    head += ["cookies sent", "DH operations (/s)", "answered", "stale replays (after DH)"]
    head += ["rate limited", "cookie/INIT bytes"]
    rows = []
    for name in out["flooder"]:
        g = flood_figures(out, name)
        rows.append(
            [
                name,
                str(g["sent"]),
                f"{g['rate']:.0f}",
                f"{g['flooder_cpu']:.2f}",
                f"{g['handled']} ({g['handled'] / max(g['sent'], 1):.0%})",
                str(g["cookies"]),
                f"{g['dh']} ({g['dh_per_s']:.0f}/s)",
                str(g["answered"]),
                str(g["stale"]),
                str(g["rate_limited"]),
                f"{COOKIE_SIZE}/{out['init_bytes']}",
            ]
        )
    return _table(head, rows)


def _edge_label(name: str) -> str:
    kind, _, k = name.partition(" ")
    k = f" {k}" if k else ""
    return {
        "start": "before baseline",
        "baseline": "flood starts",
        "flood": f"flood{k} ends",
        "after": f"end of after{k}",
        "settled": f"settled{k} (+ handshake timeout + 1 s)",
    }[kind]


def table_sizes(edges: dict[str, dict[str, Any]]) -> str:
    head = ["when", "tunnels", "replay timestamps", "indexes", "cookie sources", "streams"]
    head += ["Python blocks", "RSS MiB", "peak RSS MiB"]
    rows = []
    for name, e in edges.items():
        row = [_edge_label(name), str(e["tunnels"]), str(e["accepted_timestamps"])]
        row += [str(e["indexes"]), str(e["cookie_sources"]), str(e["streams"])]
        row += [str(e["allocated_blocks"])]
        row += [f"{e['rss_kib'] / 1024:.1f}", f"{e['hwm_kib'] / 1024:.1f}"]
        rows.append(row)
    return _table(head, rows)


def verdict(out: dict[str, Any]) -> str:
    p, e = out["phases"], out["edges"]
    repeat = out["settings"]["repeat"]
    first, last_settled = cycle_names(repeat, 1)[0], cycle_names(repeat, repeat)[2]
    base, fl = p["baseline"], p[first]
    start, settled = e["start"], e[last_settled]

    def r(key: str) -> str:
        return _ratio(fl[key], base[key]).strip(" ()") or "—"

    back = all(settled[k] <= start[k] for k in ("tunnels", "accepted_timestamps", "indexes"))
    peak = {k: max(x[k] for x in e.values()) for k in ("tunnels", "accepted_timestamps", "indexes")}
    rss = " -> ".join(
        f"{e[cycle_names(repeat, k)[2]]['rss_kib'] / 1024:.1f}" for k in range(1, repeat + 1)
    )
    dh = max(flood_figures(out, name)["dh_per_s"] for name in out["flooder"])
    lines = [
        f"{first} vs baseline: p50 {r('p50_us')}, p99 {r('p99_us')}; server CPU "
        f"{fl['server_cpu']:.2f} vs {base['server_cpu']:.2f} cores (waiting for a CPU "
        f"{fl['server_wait']:.2f} vs {base['server_wait']:.2f}); at most {dh:.0f} DH/s "
        f"(handshake_rate_limit {out['settings']['handshake_rate_limit']}/s)",
        f"tables back to their size before the flood: {'yes' if back else 'NO'} "
        f"(largest seen: {peak['tunnels']} tunnels, {peak['accepted_timestamps']} timestamps, "
        f"{peak['indexes']} indexes)",
        f"RSS {start['rss_kib'] / 1024:.1f} MiB before, {rss} MiB once settled after each "
        f"flood (peak {settled['hwm_kib'] / 1024:.1f} MiB); Python blocks "
        f"{start['allocated_blocks']} -> {settled['allocated_blocks']}",
    ]
    return "\n".join(lines)


def machine_line(m: dict[str, Any]) -> str:
    before = ", ".join(f"{x:.2f}" for x in m["loadavg"])
    after = ", ".join(f"{x:.2f}" for x in m["loadavg_after"])
    return f"machine: {m['cpus']} CPUs; load average {before} before, {after} after"


def report(out: dict[str, Any]) -> str:
    return "\n\n".join(
        [
            f"command: {out['command']}",
            machine_line(out["machine"]),
            phase_table(out["phases"]),
            flood_table(out),
            table_sizes(out["edges"]),
            verdict(out),
        ]
    )


SETTINGS = ("baseline", "flood", "after", "repeat", "handshake_timeout", "keys", "sockets")
SETTINGS += ("rate", "interval", "warmup", "timeout", "quick")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from overlay_httpx._protocol._config import TunnelConfig

    command = shlex.join([sys.executable, *sys.argv])
    started = datetime.datetime.now().isoformat(timespec="seconds")
    machine = harness_machine(("overlay_httpx", "httpx", "h2", "anyio", "cryptography"))
    with Children() as children:
        server = spawn(children, ["--serve", "--handshake-timeout", str(args.handshake_timeout)])
        info = read_line(server, "server")
        flooder_args = ["--flooder", "--target-identity", info["identity"]]
        flooder_args += ["--target-endpoint", info["endpoint"], "--keys", str(args.keys)]
        flooder_args += ["--sockets", str(args.sockets), "--rate", str(args.rate)]
        flooder = spawn(children, flooder_args)
        ready = read_line(flooder, "flooder")
        print(
            f"server {info['address']} on {info['endpoint']}; flooder ready with "
            f"{ready['keys']} initiations ({ready['generate_s']:.1f} s); measuring",
            file=sys.stderr,
            flush=True,
        )
        measured = anyio.run(measure, args, info, flooder)
        for proc in (flooder, server):  # stdin is their lifeline: a clean stop
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in (flooder, server):
            with contextlib.suppress(subprocess.TimeoutExpired):  # Children terminates it
                proc.wait(10)
    machine["loadavg_after"] = os.getloadavg()
    defaults = TunnelConfig()
    settings = {k: getattr(args, k) for k in SETTINGS}
    settings |= {
        "handshake_rate_limit": defaults.handshake_rate_limit,
        "max_pending_handshakes": defaults.max_pending_handshakes,
    }
    out = {"date": started, "command": command, "settings": settings, "machine": machine}
    return out | {"server": info, "init_bytes": ready["init_bytes"]} | measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=float, default=3.0, help="seconds before the flood")
    parser.add_argument("--flood", type=float, default=5.0, help="seconds of flood")
    parser.add_argument("--after", type=float, default=3.0, help="seconds after the flood")
    parser.add_argument(
        "--repeat", type=int, default=1, help="flood/after/settle cycles on one server"
    )
    parser.add_argument(
        "--handshake-timeout", type=float, help="the server's (default 5, 1 with --quick)"
    )
    parser.add_argument("--keys", type=int, help="fresh keys in the flood (default 2000)")
    parser.add_argument("--sockets", type=int, default=64, help="flooder's UDP source ports")
    parser.add_argument("--rate", type=int, default=50_000, help="datagrams/s, 0 = flat out")
    parser.add_argument(
        "--interval", type=float, default=0.0, help="pause between requests, s (0: back to back)"
    )
    parser.add_argument("--warmup", type=int, default=50, help="requests before measuring")
    parser.add_argument("--timeout", type=float, default=30.0, help="httpx timeout, s")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 10 s")
    parser.add_argument("--json", help="also write every figure (and raw samples) to this file")
    # the children (not run by hand)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--flooder", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target-identity", help=argparse.SUPPRESS)
    parser.add_argument("--target-endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.baseline, args.flood, args.after = 1.5, 2.0, 1.5
    if args.handshake_timeout is None:
        args.handshake_timeout = 1.0 if args.quick else 5.0
    if args.keys is None:
        args.keys = 1000 if args.quick else 2000
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.serve:
        anyio.run(_serve, args.handshake_timeout)
        return
    if args.flooder:
        _flooder(args.target_identity, args.target_endpoint, args.keys, args.sockets, args.rate)
        return
    out = run(args)
    print()
    print(report(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"figures written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; children stopped")
