"""The whole pipeline on this machine in one command: ``python -m examples.pipeline``.

Starts five processes on 127.0.0.1, each exactly as it would run on its own machine:
the rendezvous, then the three model services together, then the orchestrator (whose
start-up finds the services by tag and opens its tunnels). Each process says it is
ready with one JSON line on stdout, which is awaited, not polled for. Then it sends
``/chain`` requests and prints the result and the time breakdown (p50/p90 with
``--requests N``), and stops everything.

The runner reaches the orchestrator as any overlay client would: with its own `Node`
registered at the same rendezvous and an `httpx.AsyncClient` on an `OverlayTransport`,
at ``http://orchestrator.overlay/chain``. No TCP port is opened anywhere; the "end to
end" row shows what that extra hop costs.

Children run in their own session, so Ctrl-C reaches only the runner, which stops them
in order (orchestrator, services, rendezvous last, so each can unregister) by closing
their stdin; they also exit when stdin closes because the runner died, even by SIGKILL,
so no orphans are left. Identity keys live in a temporary directory for the run.
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from overlay_httpx import Identity, Node, OverlayTransport

from . import report
from .common import KINDS, elapsed_ms

ROOT = Path(__file__).resolve().parents[2]  # the directory holding the examples package
READY_TIMEOUT = 30.0  # seconds a child may take to start and register
ORCHESTRATOR = "http://orchestrator.overlay"
SPEECH = "The quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing"


@dataclass
class Child:
    """One process of the demo, started with a pipe on stdin (its lifeline) and stdout."""

    name: str
    process: Process
    stdout: BufferedByteReceiveStream

    @classmethod
    async def start(cls, name: str, module: str, *args: str) -> Child:
        command = [sys.executable, "-m", f"examples.pipeline.{module}", *args, "--exit-with-parent"]
        process = await anyio.open_process(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the children's warnings and errors go to our stderr
            cwd=ROOT,
            start_new_session=True,  # Ctrl-C is the runner's to handle
        )
        assert process.stdout is not None
        return cls(name, process, BufferedByteReceiveStream(process.stdout))

    async def ready(self) -> dict[str, Any]:
        """The child's ready line, once it has written it."""
        timeout = READY_TIMEOUT
        try:
            with anyio.fail_after(timeout):
                line = await self.stdout.receive_until(b"\n", 65536)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            code = await self.process.wait()
            raise RuntimeError(f"{self.name} exited with code {code} before it was ready") from None
        except TimeoutError:
            raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s") from None
        ready: dict[str, Any] = json.loads(line)
        return ready

    async def stop(self, grace: float = 10.0) -> int:
        """Close stdin (the child then stops cleanly); terminate, then kill, if it lingers."""
        process = self.process
        if process.stdin is not None:
            await process.stdin.aclose()
        with anyio.move_on_after(grace):
            await process.wait()
        if process.returncode is None:
            process.terminate()
            with anyio.move_on_after(2.0):
                await process.wait()
        if process.returncode is None:
            process.kill()
        await process.aclose()
        assert process.returncode is not None
        return process.returncode


def step(text: str) -> None:
    print(f"{text}...", end=" ", flush=True)


async def start_all(args: argparse.Namespace, keys: Path, children: list[Child]) -> str:
    """Start every process, print progress, return the rendezvous spec."""
    backend = ["--backend", args.backend]
    step("starting rendezvous")
    key = ["--identity", str(keys / "rendezvous.key")]
    children.append(
        await Child.start("rendezvous", "rendezvous", "--bind", "127.0.0.1:0", *key, *backend)
    )
    spec: str = (await children[-1].ready())["spec"]
    pid = children[-1].process.pid
    print(f"ok  {spec.split('@')[1]}  key {spec.split('@')[0][:18]}...  pid {pid}")
    node_args = ["--rendezvous", spec, *backend]
    print(f"starting model services ({', '.join(KINDS)}, {args.compute_ms:g} ms compute)...")
    for kind in KINDS:  # all three start at once; their ready lines are read in order
        key = ["--identity", str(keys / f"{kind}.key")]
        compute = ["--compute-ms", str(args.compute_ms)]
        children.append(await Child.start(kind, kind, *node_args, *key, *compute))
    for child in children[1:]:
        info = await child.ready()
        tags = ",".join(info["tags"])
        host = f"{info['hostname']}.overlay"
        print(
            f"  {child.name:<6} ok  {info['address']}  {host:<14} tags {tags:<20} pid {info['pid']}"
        )
    step("starting orchestrator (finds services by tag, opens tunnels)")
    key = ["--identity", str(keys / "orchestrator.key")]
    children.append(await Child.start("orchestrator", "orchestrator", *node_args, *key))
    info = await children[-1].ready()
    print(f"ok  {info['address']}  pid {info['pid']}")
    return spec


async def demo(args: argparse.Namespace, spec: str) -> None:
    """Talk to the orchestrator over the overlay, print what it answers and how long it took."""
    async with (
        Node(Identity.generate(), rendezvous=spec) as node,
        httpx.AsyncClient(transport=OverlayTransport(node), timeout=60.0) as client,
    ):
        step("checking the registry")
        found = await node.find_by_tag("model-service")
        if len(found) != len(KINDS):
            raise RuntimeError(f"{len(found)} model services registered, expected {len(KINDS)}")
        print(f"ok  {len(found)} model services, 1 orchestrator")
        health = (await client.get(f"{ORCHESTRATOR}/health")).raise_for_status().json()
        setups = ", ".join(f"{s['kind']} {s['setup_ms']:.1f} ms" for s in health["services"])
        print(f"tunnels opened once by the orchestrator at start-up: {setups}\n")
        audio = base64.b64encode(args.say.encode()).decode("ascii")
        samples: list[list[report.Row]] = []
        for _ in range(args.requests):
            started = time.perf_counter()
            response = await client.post(f"{ORCHESTRATOR}/chain", json={"audio_b64": audio})
            chain = response.raise_for_status().json()
            samples.append(report.rows(chain, elapsed_ms(started)))
            if len(samples) == 1:
                print(report.result(chain) + "\n")
                print("first request:\n" + report.breakdown(samples[0]) + "\n")
        if len(samples) > 1:
            print(f"over {len(samples)} requests (ms):\n{report.percentiles(samples)}\n")
        print(report.summary(samples))


async def stop_on_signal(scope: anyio.CancelScope, received: list[int]) -> None:
    """Ctrl-C or SIGTERM: cancel the demo, so that the children are stopped in order."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            received.append(signum)
            scope.cancel()
            return


async def run(args: argparse.Namespace) -> int:
    children: list[Child] = []
    received: list[int] = []
    status = 0
    with tempfile.TemporaryDirectory(prefix="overlay-pipeline-") as keys:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(stop_on_signal, tg.cancel_scope, received)
                try:
                    await demo(args, await start_all(args, Path(keys), children))
                except (RuntimeError, httpx.HTTPError) as exc:
                    print(f"\nerror: {exc}", file=sys.stderr)
                    status = 1
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                step(f"\nstopping {', '.join(c.name for c in reversed(children))}")
                codes = [await c.stop() for c in reversed(children)]
    if any(codes):
        print(f"exit codes {codes}")
        return status or 1
    print(f"ok  {len(codes)} processes stopped cleanly")
    if received:
        print(f"interrupted by {signal.Signals(received[0]).name}", file=sys.stderr)
        return 128 + received[0]
    return status


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m examples.pipeline",
        description="Run the three-model pipeline demo on 127.0.0.1 and print timings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--requests", type=int, default=1, help="chains to run, one after another")
    p.add_argument("--compute-ms", type=float, default=200.0, help="stand-in compute per model")
    p.add_argument("--say", default=SPEECH, help="what the 'audio' says")
    p.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = p.parse_args(argv)
    if args.requests < 1 or args.compute_ms < 0:
        p.error("--requests must be >= 1 and --compute-ms >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return anyio.run(run, args, backend=args.backend)
    except KeyboardInterrupt:  # before the signal handler was in place: nothing to stop
        return 130
