"""The same FastAPI app over overlay_httpx and over TCP, side by side in one run.

Rows (each server in its own process, the clients in this one, rounds interleaved):
  * overlay     httpx + OverlayTransport (HTTP/2 over an overlay tunnel) -> serve()
  * tcp         httpx HTTP/1.1 keep-alive over TCP -> uvicorn          (the baseline)
  * tls-new     httpx with a new TLS connection per request -> uvicorn over TLS
Measures: sequential small JSON POST p50/p90/p99, requests/s with 64 in flight,
64 MiB GET MB/s, SSE time to first chunk, and (overlay) the first request to a
new peer, handshake included.

Run:  .venv/bin/python benchmarks/bench_http.py [--rounds 3] [--json out.json]
This machine is shared and noisy: compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import ipaddress
import json
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx

HERE = Path(__file__).resolve().parent
PAYLOAD = {"prompt": "hello", "max_tokens": 16}


# -- servers -------------------------------------------------------------------------------


def serve_overlay() -> None:
    """Child process: serve the app on a node and print how to reach it."""
    sys.path.insert(0, str(HERE))
    from _http_app import app

    from overlay_httpx import Identity, Node, serve

    async def main() -> None:
        async with Node(Identity.generate()) as node, anyio.create_task_group() as tg:
            await tg.start(functools.partial(serve, app, node))
            info = {"address": str(node.address), "identity": str(node.public)}
            info["endpoint"] = "{}:{}".format(*node.endpoint)
            print(json.dumps(info), flush=True)
            await anyio.sleep_forever()

    anyio.run(main)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _uvicorn(port: int, *tls: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "uvicorn", "_http_app:app", "--app-dir", str(HERE)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *tls]
    return subprocess.Popen(cmd)


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start")


# -- measurements ------------------------------------------------------------------------


async def sequential(client: httpx.AsyncClient, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        r = await client.post("/v1/echo", json=PAYLOAD)
        r.raise_for_status()
        samples.append(time.perf_counter() - start)
    return samples


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


class Servers:
    """uvicorn over TCP, uvicorn over TLS and an overlay node, each in a child process."""

    def __init__(self) -> None:
        tmp = Path(tempfile.mkdtemp())
        key, self.cert = _self_signed(tmp)
        self.tcp_port, self.tls_port = _free_port(), _free_port()
        self.procs = [
            _uvicorn(self.tcp_port),
            _uvicorn(self.tls_port, "--ssl-keyfile", str(key), "--ssl-certfile", str(self.cert)),
        ]
        overlay = subprocess.Popen(
            [sys.executable, __file__, "--serve-overlay"], stdout=subprocess.PIPE
        )
        self.procs.append(overlay)
        assert overlay.stdout is not None
        self.overlay: dict[str, str] = json.loads(overlay.stdout.readline())
        _wait_port(self.tcp_port)
        _wait_port(self.tls_port)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)


async def main(args: argparse.Namespace, servers: Servers) -> dict[str, object]:
    from overlay_httpx import Identity, Node, OverlayTransport, PublicIdentity

    info, cert = servers.overlay, servers.cert
    tcp_port, tls_port = servers.tcp_port, servers.tls_port
    ctx = ssl.create_default_context(cafile=str(cert))
    results: dict[str, dict[str, list[float]]] = {}

    def record(row: str, metric: str, value: float) -> None:
        results.setdefault(row, {}).setdefault(metric, []).append(value)

    async with Node(Identity.generate()) as node:
        server_identity = PublicIdentity.parse(info["identity"])
        node.add_peer(info["address"], server_identity, info["endpoint"])
        host = f"http://{node.peers()[0].address.host}"
        clients: dict[str, Callable[[], httpx.AsyncClient]] = {
            "overlay": lambda: httpx.AsyncClient(
                transport=OverlayTransport(node), base_url=host, timeout=60
            ),
            "tcp": lambda: httpx.AsyncClient(base_url=f"http://127.0.0.1:{tcp_port}", timeout=60),
            "tls-new": lambda: httpx.AsyncClient(
                base_url=f"https://127.0.0.1:{tls_port}",
                verify=ctx,
                timeout=60,
                limits=httpx.Limits(max_keepalive_connections=0),
            ),
        }
        for round_ in range(args.rounds):
            for row, make in clients.items():
                async with make() as client:
                    await sequential(client, 20)  # warm up
                    seq = await sequential(client, args.requests)
                    for q, name in ((0.5, "p50_us"), (0.9, "p90_us"), (0.99, "p99_us")):
                        record(row, name, _pct(seq, q))
                    record(row, "rps_64", await in_flight(client, 64, args.per_worker))
                    if row != "tls-new":
                        record(row, "get_MBps", await bulk(client, args.mib))
                    record(row, "sse_first_us", _pct(await sse_first_chunk(client, 50), 0.5))
            for _ in range(args.cold):  # a new peer: node + handshake + request
                start = time.perf_counter()
                async with Node(Identity.generate()) as fresh:
                    fresh.add_peer(info["address"], server_identity, info["endpoint"])
                    async with httpx.AsyncClient(
                        transport=OverlayTransport(fresh), base_url=host
                    ) as client:
                        (await client.post("/v1/echo", json=PAYLOAD)).raise_for_status()
                        record("overlay", "cold_us", (time.perf_counter() - start) * 1e6)
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    summary = {row: {k: statistics.median(v) for k, v in m.items()} for row, m in results.items()}
    _print(summary)
    return {"rounds": args.rounds, "rows": summary}


def _print(s: dict[str, dict[str, float]]) -> None:
    base = s["tcp"]
    print("\n| row | p50 µs | p90 µs | p99 µs | req/s, 64 in flight | 64 MiB GET MB/s", end="")
    print(" | SSE first chunk µs |")
    print("|---|---|---|---|---|---|---|")
    for row, m in s.items():
        get = f"{m['get_MBps']:.0f}" if "get_MBps" in m else "—"
        print(
            f"| {row} | {m['p50_us']:.0f} | {m['p90_us']:.0f} | {m['p99_us']:.0f} | "
            f"{m['rps_64']:.0f} | {get} | {m['sse_first_us']:.0f} |"
        )
    o = s["overlay"]
    print("\nratios to tcp keep-alive (targets in brackets):")
    print(f"  p50 latency      {o['p50_us'] / base['p50_us']:.2f}x  [<= 1.0x]")
    print(f"  64 in flight     {o['rps_64'] / base['rps_64']:.2f}x  [>= 1.5x]")
    print(f"  64 MiB GET       {o['get_MBps'] / base['get_MBps']:.2f}x  [>= 0.3x]")
    print(f"  SSE first chunk  {o['sse_first_us'] / base['sse_first_us']:.2f}x  [<= 1.0x]")
    print(
        f"  cold first request {o['cold_us']:.0f} µs vs new-TLS-connection p50 "
        f"{s['tls-new']['p50_us']:.0f} µs  [below]"
    )


if __name__ == "__main__":
    if "--serve-overlay" in sys.argv:
        serve_overlay()
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--per-worker", type=int, default=20)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    ns = parser.parse_args()
    running = Servers()
    try:
        out = anyio.run(main, ns, running)
    finally:
        running.stop()
    if ns.json:
        Path(ns.json).write_text(json.dumps(out, indent=2))
