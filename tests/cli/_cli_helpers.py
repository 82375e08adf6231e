"""Helpers for CLI tests: running ``python -m overlay_httpx`` and a tiny HTTP/1.1 upstream.

Child processes get a private ``XDG_CONFIG_HOME`` and none of the
``OVERLAY_HTTPX_*`` variables, so nothing reads or writes the user's real
identity. Ready lines are waited for with ``select`` and a deadline, never by
sleeping. The upstream is an h11 server on anyio, so it runs on asyncio and
trio alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import h11
from anyio.abc import ByteStream, SocketAttribute

READY_TIMEOUT = 15.0


def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAY_HTTPX_")}
    env["XDG_CONFIG_HOME"] = str(home / "config")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_cli(
    args: Sequence[str], cwd: Path, *, stdin: int | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "overlay_httpx", *args],
        cwd=cwd,
        env=cli_env(cwd),
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )


@dataclass
class Finished:
    code: int
    stdout: str
    stderr: str


def finish(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> Finished:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"{proc.args} did not finish: {err.decode(errors='replace')}"
        ) from None
    return Finished(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def run_cli(args: Sequence[str], cwd: Path) -> Finished:
    return finish(start_cli(args, cwd))


def run_many(commands: Sequence[Sequence[str]], cwd: Path) -> list[Finished]:
    """Run several command lines at once (they are independent; this saves wall time)."""
    procs = [start_cli(args, cwd) for args in commands]
    return [finish(proc) for proc in procs]


def wait_for_line(proc: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT) -> str:
    """The first line the child writes on stdout (it must come within `timeout`)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            proc.kill()
            raise AssertionError(f"no line from {proc.args} within {timeout}s: {data!r}")
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                result = finish(proc)
                raise AssertionError(f"{proc.args} exited {result.code}: {result.stderr}")
            data += chunk
    return data.split(b"\n", 1)[0].decode()


def ready_fields(line: str) -> dict[str, str]:
    """``overlay-httpx serve: ready key=value ...`` as a dict."""
    assert " ready " in line, line
    pairs = line.split(" ready ", 1)[1].split()
    return dict(pair.split("=", 1) for pair in pairs)


# -- a small HTTP/1.1 upstream ----------------------------------------------------------


@dataclass
class Upstream:
    """What the upstream saw, plus gates the tests open to prove streaming."""

    port: int = 0
    requests: list[dict[str, object]] = field(default_factory=list)
    first_chunk_seen: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)


async def _next_event(conn: h11.Connection, stream: ByteStream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            data = b""
        conn.receive_data(data)


async def _send(conn: h11.Connection, stream: ByteStream, event: object) -> None:
    data = conn.send(event)  # type: ignore[arg-type]
    if data:
        await stream.send(data)


async def _handle(state: Upstream, stream: ByteStream) -> None:
    conn = h11.Connection(h11.SERVER)
    async with stream:
        while True:
            request = await _next_event(conn, stream)
            if not isinstance(request, h11.Request):
                return
            target = request.target.decode()
            digest, size, chunks = hashlib.sha256(), 0, 0
            while True:
                event = await _next_event(conn, stream)
                if isinstance(event, h11.Data):
                    digest.update(event.data)
                    size += len(event.data)
                    chunks += 1
                    state.first_chunk_seen.set()
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            headers = [(n.decode(), v.decode()) for n, v in request.headers]
            state.requests.append({"method": request.method.decode(), "target": target})
            if target.startswith("/stream-down"):
                await _send(conn, stream, h11.Response(status_code=200, headers=[]))
                await _send(conn, stream, h11.Data(data=b"first;"))
                await state.release.wait()
                await _send(conn, stream, h11.Data(data=b"second"))
            else:
                answer = {
                    "method": request.method.decode(),
                    "target": target,
                    "headers": headers,
                    "sha256": digest.hexdigest(),
                    "size": size,
                }
                body = json.dumps(answer).encode()
                head = [("content-type", "application/json"), ("content-length", str(len(body)))]
                head.append(("x-upstream", "tiny"))
                await _send(conn, stream, h11.Response(status_code=201, headers=head))
                await _send(conn, stream, h11.Data(data=body))
            await _send(conn, stream, h11.EndOfMessage())
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()


@asynccontextmanager
async def http11_upstream() -> AsyncIterator[Upstream]:
    """An HTTP/1.1 server on 127.0.0.1 (keep-alive, chunked bodies both ways)."""
    state = Upstream()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    state.port = int(listener.extra(SocketAttribute.local_port))
    async with listener, anyio.create_task_group() as group:

        async def handle(stream: ByteStream) -> None:
            await _handle(state, stream)

        group.start_soon(listener.serve, handle)
        yield state
        group.cancel_scope.cancel()
