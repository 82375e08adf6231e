"""The fault soak's load generator: steady POST /chain plus idempotent GET /health.

Why: the soak (`soak_pipeline.py`) needs an overlay client that keeps offering the same
load whatever the faults do (open loop: a request starts every ``1/rate`` seconds
whether or not earlier ones finished), gives every request a unique id, and writes down
what became of each one, so that nothing can be lost silently.

How: its own `Node`, registered at the soak's rendezvous, and one
`httpx.AsyncClient` on a `CountingTransport` (an `OverlayTransport` that counts its
automatic re-sends). Requests:

* ``POST http://orchestrator.overlay/chain`` at ``--rate`` per second, id
  ``c<n>``: not idempotent, so never retried by this client; only the transport may
  re-send one the server never began;
* ``GET /health`` at ``--health-rate`` per second, id ``g<n>``, round robin over
  the orchestrator and ``stt``/``llm``/``image``.tag.overlay: idempotent, so this
  client retries them itself (``--get-retries`` times, after a transport error or a
  502/503/504) and counts those retries.

Every request gets a ``start`` line and then exactly one ``end`` line in ``--out``
(JSON lines: wall-clock start and end, latency, outcome, the reason of a failure,
transport attempts, client retries). Prints ``{"ready": true}`` once the orchestrator
answered, stops starting requests when stdin closes, waits for those in flight (each
is bounded by ``--timeout``), prints ``{"done": true, ...}`` and exits.

Not run by hand; the soak starts it as ``python benchmarks/_soak_load.py --rendezvous
SPEC --out FILE``.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
import httpx
from _soak_common import (
    ID_HEADER,
    CountingTransport,
    attempts,
    configure_logging,
    die_with_parent,
    emit,
    repo_root,
)

sys.path.insert(0, str(repo_root()))
from examples.pipeline.common import stdin_eof
from overlay_httpx import Identity, Node

ORCHESTRATOR = "http://orchestrator.overlay"
HEALTH_TARGETS = (
    "http://orchestrator.overlay/health",
    "http://stt.tag.overlay/health",
    "http://llm.tag.overlay/health",
    "http://image.tag.overlay/health",
)
AUDIO = base64.b64encode(b"tunnels that survive faults do not lose requests").decode()
RETRY_STATUSES = frozenset({502, 503, 504})


def reason_of(exc: BaseException) -> str:
    """``Class: message`` for a failure (never empty)."""
    message = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {message}"


def http_reason(response: httpx.Response) -> str:
    detail: Any
    try:
        detail = response.json().get("detail", "")
    except (ValueError, AttributeError):
        detail = response.text[:200]
    return f"HTTP {response.status_code}: {' '.join(str(detail).split()) or '(no detail)'}"


class Recorder:
    """The JSON-lines file of request starts and ends."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self.sent = 0
        self.ended = 0

    def start(self, request_id: str, kind: str, method: str, url: str) -> None:
        self.sent += 1
        line = {"ev": "start", "id": request_id, "kind": kind, "method": method, "url": url}
        self._write({**line, "t": time.time()})

    def end(self, record: dict[str, Any]) -> None:
        self.ended += 1
        self._write({"ev": "end", **record})

    def _write(self, line: dict[str, Any]) -> None:
        self._file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self._file.close()


class Load:
    def __init__(self, client: httpx.AsyncClient, recorder: Recorder, args: argparse.Namespace):
        self.client = client
        self.recorder = recorder
        self.args = args

    async def chain(self, n: int) -> None:
        request_id = f"{self.args.prefix}c{n:06d}"
        url = f"{ORCHESTRATOR}/chain"
        request = self.client.build_request(
            "POST", url, json={"audio_b64": AUDIO}, headers={ID_HEADER: request_id}
        )
        self.recorder.start(request_id, "chain", "POST", url)
        started, t0 = time.perf_counter(), time.time()
        record: dict[str, Any] = {"id": request_id, "kind": "chain", "t0": t0}
        try:
            response = await self.client.send(request)
            if response.status_code == 200 and "transcript" in response.json():
                record.update(outcome="ok", status=200)
            else:
                record.update(
                    outcome="failed", status=response.status_code, reason=http_reason(response)
                )
        except Exception as exc:  # every failure is recorded, with its class and message
            record.update(outcome="failed", reason=reason_of(exc))
        record.update(
            t1=time.time(),
            ms=round((time.perf_counter() - started) * 1000, 3),
            attempts=attempts(request),
            client_retries=0,
        )
        self.recorder.end(record)

    async def health(self, n: int) -> None:
        request_id = f"{self.args.prefix}g{n:06d}"
        url = HEALTH_TARGETS[n % len(HEALTH_TARGETS)]
        kind = "health:" + url.split("//")[1].split(".")[0]
        self.recorder.start(request_id, kind, "GET", url)
        started, t0 = time.perf_counter(), time.time()
        transport_attempts = 0
        retry_reasons: list[str] = []
        for attempt in range(1 + self.args.get_retries):
            if attempt:
                await anyio.sleep(self.args.get_backoff * attempt)
            request = self.client.build_request("GET", url, headers={ID_HEADER: request_id})
            status: int | None = None
            reason: str | None = None
            try:
                response = await self.client.send(request)
                status = response.status_code
                if status != 200:
                    reason = http_reason(response)
            except Exception as exc:  # every failure is recorded, with its class and message
                reason = reason_of(exc)
            transport_attempts += attempts(request)
            if reason is None:
                break
            if status not in (None, *RETRY_STATUSES) or attempt == self.args.get_retries:
                break  # a 4xx or 500 is an answer, not a transport problem
            retry_reasons.append(reason)
        record: dict[str, Any] = {"id": request_id, "kind": kind, "t0": t0}
        if reason is None:
            record.update(outcome="ok", status=200)
        else:
            record.update(outcome="failed", status=status, reason=reason)
        record.update(
            t1=time.time(),
            ms=round((time.perf_counter() - started) * 1000, 3),
            attempts=transport_attempts,
            client_retries=len(retry_reasons),
            retry_reasons=retry_reasons,
        )
        self.recorder.end(record)


async def paced(
    rate: float, job: Callable[[int], Coroutine[Any, Any, None]], stop: anyio.Event
) -> None:
    """Start ``job(n)`` every 1/`rate` s (open loop) until `stop`; wait for them all."""
    if rate <= 0:
        return
    interval = 1.0 / rate
    async with anyio.create_task_group() as tg:
        n = 0
        due = anyio.current_time()
        while not stop.is_set():
            tg.start_soon(job, n)
            n += 1
            due += interval
            now = anyio.current_time()
            if due < now - 1.0:  # more than a second behind (CPU starved): do not burst
                due = now
            with anyio.move_on_after(max(0.0, due - now)):
                await stop.wait()


async def stdin_closed(stop: anyio.Event) -> None:
    await stdin_eof()
    stop.set()


async def run(args: argparse.Namespace) -> None:
    recorder = Recorder(args.out)
    timeout = httpx.Timeout(args.timeout)
    async with (
        Node(Identity.generate(), bind=args.bind, rendezvous=args.rendezvous) as node,
        httpx.AsyncClient(transport=CountingTransport(node), timeout=timeout) as client,
    ):
        await node.wait_registered()
        with anyio.fail_after(30):
            while True:  # the orchestrator may still be registering
                try:
                    (await client.get(f"{ORCHESTRATOR}/health")).raise_for_status()
                    break
                except httpx.HTTPError:
                    await anyio.sleep(0.2)
        emit(ready=True, name="load", address=str(node.address))
        load = Load(client, recorder, args)
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(stdin_closed, stop)
            async with anyio.create_task_group() as jobs:
                jobs.start_soon(paced, args.rate, load.chain, stop)
                jobs.start_soon(paced, args.health_rate, load.health, stop)
            tg.cancel_scope.cancel()
    recorder.close()
    emit(done=True, sent=recorder.sent, ended=recorder.ended)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="the fault soak's load generator (not run by hand)")
    p.add_argument("--rendezvous", required=True)
    p.add_argument("--bind", default="127.0.0.1:0")
    p.add_argument("--out", required=True, help="JSON-lines file of request starts and ends")
    p.add_argument("--rate", type=float, default=10.0, help="POST /chain per second")
    p.add_argument("--health-rate", type=float, default=4.0, help="GET /health per second")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request attempt")
    p.add_argument("--prefix", default="", help="prefix of every request id")
    p.add_argument("--get-retries", type=int, default=2, help="client retries of a GET")
    p.add_argument("--get-backoff", type=float, default=0.25, help="seconds x retry number")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    die_with_parent()
    args = parse_args(argv)
    configure_logging("load")
    try:
        anyio.run(run, args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
