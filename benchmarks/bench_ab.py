"""A/B of two builds of overlay_httpx, side by side: what one change does to HTTP speed.

Why: this machine's speed drifts from minute to minute (other users, and how busy
it has just been), so two benchmark runs minutes apart cannot tell a 5 % change
from the drift. Here each build gets its own server process (`serve()` of the
benchmark app on a node) and its own client process, and the two builds take
turns, so the drift lands on both alike. Measures:

  * sequential small JSON POSTs, in turns of `--per`: p50 latency, and client and
    server CPU per request (medians of the turns);
  * the first request to a new peer from a client in use, handshake included
    (the server process serves the app on `--cold` more nodes), one per build in
    turn, 20 ms apart;
  * a 64 MiB GET, MB/s, one per build in turn.

Run (a build is a directory that `import overlay_httpx` finds first: a source
tree's root, or `build/compiled` after `tools/build_compiled.sh`):

  git worktree add /tmp/before HEAD~1 && (cd /tmp/before && tools/build_compiled.sh)
  tools/build_compiled.sh
  .venv/bin/python benchmarks/bench_ab.py /tmp/before/build/compiled build/compiled

Prints a markdown table: each measure for A and B, and B/A.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _harness import Children, proc_cpu_seconds


def child(info: dict[str, Any], server_pid: int) -> None:
    """One build's client: answers each command on stdin with one JSON line."""
    import anyio
    import httpx
    from bench_http import bulk, sequential, timed_post

    from overlay_httpx import Address, Identity, Node, OverlayTransport, PublicIdentity

    def host(peer: dict[str, Any]) -> str:
        return f"http://{Address.parse(peer['address']).host}"

    async def posts(client: httpx.AsyncClient, count: int) -> dict[str, Any]:
        cpu, server = time.process_time(), proc_cpu_seconds(server_pid)
        latencies = await sequential(client, count)
        return {
            "latencies": latencies,
            "client_cpu": (time.process_time() - cpu) / count,
            "server_cpu": (proc_cpu_seconds(server_pid) - server) / count,
        }

    async def main() -> None:
        async with Node(Identity.generate()) as node:
            for peer in [info, *info["peers"]]:
                node.add_peer(
                    peer["address"], PublicIdentity.parse(peer["identity"]), peer["endpoint"]
                )
            fresh = iter(info["peers"])
            transport = OverlayTransport(node)
            async with httpx.AsyncClient(
                transport=transport, base_url=host(info), timeout=60
            ) as client:
                await posts(client, 200)  # warm-up
                print(json.dumps("ready"), flush=True)
                for line in sys.stdin:
                    command, *arg = line.split()
                    result: Any
                    if command == "post":
                        result = await posts(client, int(arg[0]))
                    elif command == "cold":
                        await anyio.sleep(0.02)
                        result = await timed_post(client, host(next(fresh)) + "/v1/echo")
                    else:
                        result = await bulk(client, 64)
                    print(json.dumps(result), flush=True)

    anyio.run(main)


class Build:
    """One build's server and client processes, and what its client answered."""

    def __init__(self, children: Children, tree: Path, cold: int) -> None:
        env = {"PYTHONPATH": str(tree.resolve())}
        server, info = children.overlay("_http_app:app", env, peers=cold)
        cmd = [sys.executable, __file__, "--child", json.dumps(info), str(server.pid)]
        self._client = children.spawn(cmd, env=env, pipe=True, pipe_in=True)
        if self._read() != "ready":
            raise RuntimeError(f"the client of {tree} did not start")
        self.results: dict[str, list[Any]] = {"post": [], "cold": [], "get": []}

    def _read(self) -> Any:
        assert self._client.stdout is not None
        line = self._client.stdout.readline()
        if not line:
            raise RuntimeError(f"a client exited with {self._client.wait()}")
        return json.loads(line)

    def ask(self, command: str) -> None:
        assert self._client.stdin is not None
        self._client.stdin.write(f"{command}\n".encode())
        self._client.stdin.flush()
        self.results[command.split()[0]].append(self._read())

    def figures(self) -> dict[str, float]:
        posts = self.results["post"]
        return {
            "p50_us": statistics.median(x for p in posts for x in p["latencies"]) * 1e6,
            "client_cpu_us": statistics.median(p["client_cpu"] for p in posts) * 1e6,
            "server_cpu_us": statistics.median(p["server_cpu"] for p in posts) * 1e6,
            "cold_us": statistics.median(self.results["cold"]) * 1e6,
            "get_MBps": statistics.median(self.results["get"]),
        }


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(json.loads(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="build A (before the change)")
    parser.add_argument("b", type=Path, help="build B (after it)")
    parser.add_argument("--chunks", type=int, default=12, help="turns of sequential POSTs")
    parser.add_argument("--per", type=int, default=300, help="sequential POSTs per turn")
    parser.add_argument("--cold", type=int, default=60, help="first requests to new peers")
    parser.add_argument("--gets", type=int, default=12, help="64 MiB GETs")
    args = parser.parse_args()
    for name in ("chunks", "per", "cold", "gets"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    for tree in (args.a, args.b):
        if not (tree / "overlay_httpx" / "__init__.py").is_file():
            parser.error(f"{tree} holds no overlay_httpx package (a build or a source tree root)")
    with Children() as children:
        builds = {"A": Build(children, args.a, args.cold), "B": Build(children, args.b, args.cold)}
        steps = [("post", args.chunks, f"post {args.per}"), ("cold", args.cold, "cold")]
        steps.append(("get", args.gets, "get"))
        for _, count, command in steps:
            for i in range(count):
                for name in "AB" if i % 2 == 0 else "BA":
                    builds[name].ask(command)
        a, b = builds["A"].figures(), builds["B"].figures()
    rows = [
        ("sequential POST p50, µs", "p50_us"),
        ("client CPU per request, µs", "client_cpu_us"),
        ("server CPU per request, µs", "server_cpu_us"),
        ("first request to a new peer, µs", "cold_us"),
        ("64 MiB GET, MB/s", "get_MBps"),
    ]
    print(f"A: {args.a}\nB: {args.b}\n")
    print("| measure | A | B | B/A |\n|---|---|---|---|")
    for label, key in rows:
        print(f"| {label} | {a[key]:.0f} | {b[key]:.0f} | {b[key] / a[key]:.3f}x |")


if __name__ == "__main__":
    main()
