"""Shared pieces of the HTTP benchmarks: servers in child processes, TLS, CPU accounting.

Why: `bench_http.py` and `bench_chain.py` both compare overlay_httpx with ordinary
HTTP servers, and a fair comparison keeps every server in its own process (so the
client's event loop never runs server code) while the clients share one process
and interleave their rounds. This module starts those children (uvicorn over TCP
or TLS, hypercorn over TLS with HTTP/2, `serve()` on an overlay node), makes a
throw-away self-signed certificate, reads a child's CPU time from
`/proc/<pid>/stat`, and makes sure no child outlives the benchmark: they are
terminated on exit, on Ctrl-C and on SIGTERM, and the kernel kills them if the
benchmark itself dies (PR_SET_PDEATHSIG).

It is not run by hand: the benchmarks run it as a child,
`python _harness.py overlay MODULE:APP [PEERS]` (PEERS more nodes serving the
same app) or `python _harness.py hypercorn MODULE:APP PORT KEY CERT`.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import importlib
import importlib.util
import ipaddress
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import types
from contextlib import AsyncExitStack
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_PR_SET_PDEATHSIG = 1


def require(module: str, why: str) -> None:
    """Exit with one clear line when an optional benchmark dependency is missing."""
    if importlib.util.find_spec(module) is None:
        prog = Path(sys.argv[0]).name
        print(
            f"{prog}: {module} is not installed ({why}); "
            f"install it with: .venv/bin/python -m pip install {module}",
            file=sys.stderr,
        )
        raise SystemExit(2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Wait until something accepts on 127.0.0.1:`port`; fail early if `proc` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for port {port} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start within {timeout:.0f} s")


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A P-256 key and a certificate for 127.0.0.1 that is its own CA: (key, cert)."""
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


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine(packages: tuple[str, ...]) -> dict[str, Any]:
    """What a benchmark's figures depend on: CPUs, load, Python and `packages`' versions."""
    versions: dict[str, str | None] = {}
    for pkg in packages:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
        "versions": versions,
        "tunnel_core": tunnel_core(),
    }


def tunnel_core() -> str:
    """Which build of overlay_httpx's tunnel core this process imports, and from where.

    The wheel compiles it with mypyc (tools/build_compiled.sh makes one to
    measure); the editable development install is pure Python.
    """
    import overlay_httpx
    from overlay_httpx._protocol import COMPILED

    build = "compiled" if COMPILED else "pure Python"
    return f"{build} ({Path(overlay_httpx.__file__).parent})"


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads), from /proc/<pid>/stat.

    The kernel counts in clock ticks (10 ms at the usual 100 Hz), so measure phases
    that last a second or more.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; fields[0] is state
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime: fields 14 and 15


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: rely on the parent's clean-up
        pass


class Children:
    """Child processes that are terminated when the `with` block ends, however it ends."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self._previous: Any = None

    def __enter__(self) -> Children:
        def on_term(signum: int, frame: types.FrameType | None) -> None:
            raise SystemExit(128 + signum)

        self._previous = signal.signal(signal.SIGTERM, on_term)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        signal.signal(signal.SIGTERM, self._previous)

    def spawn(
        self,
        cmd: list[str],
        *,
        env: dict[str, str] | None = None,
        pipe: bool = False,
        pipe_in: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start `cmd`; `pipe`: read its stdout, `pipe_in`: write its stdin."""
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE if pipe_in else None,
            stdout=subprocess.PIPE if pipe else None,
            preexec_fn=_die_with_parent,  # only prctl() between fork and exec
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def uvicorn(
        self,
        app: str,
        port: int,
        tls: tuple[Path, Path] | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """uvicorn serving `app` ("module:attr" in benchmarks/) on 127.0.0.1:`port`."""
        cmd = [sys.executable, "-m", "uvicorn", app, "--app-dir", str(HERE)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        if tls is not None:
            cmd += ["--ssl-keyfile", str(tls[0]), "--ssl-certfile", str(tls[1])]
        return self.spawn(cmd, env=env)

    def hypercorn(self, app: str, port: int, tls: tuple[Path, Path]) -> subprocess.Popen[bytes]:
        """hypercorn serving `app` over TLS (ALPN h2, http/1.1) on 127.0.0.1:`port`."""
        cmd = [sys.executable, __file__, "hypercorn", app, str(port), str(tls[0]), str(tls[1])]
        return self.spawn(cmd)

    def overlay(
        self, app: str, env: dict[str, str] | None = None, *, peers: int = 0
    ) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        """`serve()` of `app` on a new node; returns the process and how to reach the node.

        With `peers`, the same process also serves `app` on that many more nodes,
        listed under "peers": servers a client has never talked to, for timing the
        first request to a new peer from a client already in use.
        """
        proc = self.start_overlay(app, env, peers=peers)
        return proc, overlay_info(proc)

    def start_overlay(
        self, app: str, env: dict[str, str] | None = None, *, peers: int = 0
    ) -> subprocess.Popen[bytes]:
        """Start `serve()` of `app` on a new node; `overlay_info(proc)` waits until it serves."""
        cmd = [sys.executable, __file__, "overlay", app, str(peers)]
        return self.spawn(cmd, env=env, pipe=True)


def overlay_info(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """The node's address, identity and UDP endpoint: the one JSON line the child prints."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"overlay server exited with {proc.wait()}")
    return json.loads(line)  # type: ignore[no-any-return]


# -- the children ----------------------------------------------------------------------------


def _load(ref: str) -> Any:
    sys.path.insert(0, str(HERE))
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _serve_overlay(ref: str, peers: int) -> None:
    import anyio

    from overlay_httpx import Identity, Node, serve

    app = _load(ref)

    def reach(node: Node) -> dict[str, Any]:
        return {
            "address": str(node.address),
            "identity": str(node.public),
            "endpoint": "{}:{}".format(*node.endpoint),
        }

    async def main() -> None:
        async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
            nodes = [
                await stack.enter_async_context(Node(Identity.generate())) for _ in range(1 + peers)
            ]
            for node in nodes:
                await tg.start(functools.partial(serve, app, node))
            info = reach(nodes[0])
            info["tunnel_core"] = tunnel_core()
            info["peers"] = [reach(node) for node in nodes[1:]]
            print(json.dumps(info), flush=True)
            await anyio.sleep_forever()

    anyio.run(main)


def _serve_hypercorn(ref: str, port: str, key: str, cert: str) -> None:
    import asyncio

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.keyfile, config.certfile = key, cert
    config.loglevel = "WARNING"
    # hypercorn closes a connection after 1000 requests by default (uvicorn has no such
    # limit), and httpx's HTTP/2 pool fails requests in flight when that happens.
    config.keep_alive_max_requests = 1 << 40
    asyncio.run(serve(_load(ref), config))


if __name__ == "__main__":
    try:
        if sys.argv[1] == "overlay":
            _serve_overlay(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
        elif sys.argv[1] == "hypercorn":
            _serve_hypercorn(*sys.argv[2:6])
        else:
            sys.exit(f"usage: {sys.argv[0]} overlay|hypercorn MODULE:APP [PEERS | PORT KEY CERT]")
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent reports
        pass
