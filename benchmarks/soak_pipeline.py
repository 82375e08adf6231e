"""Fault soak: the three-model pipeline under steady load while faults are injected.

What: the pipeline example (``examples/pipeline``: rendezvous, ``stt``, ``llm``,
``image``, orchestrator) runs as separate processes, with a load generator offering a
steady rate of non-idempotent ``POST /chain`` requests (never retried by the client)
and idempotent ``GET /health`` requests (retried by the client, up to twice) over
`OverlayTransport`. After a steady baseline, four faults follow, each in its own phase
(a fault window, then a recovery window):

1. ``kill-llm``: SIGKILL the llm service, restart it after a pause with the same key,
   port, tags and hostname;
2. ``restart-rendezvous``: SIGKILL the rendezvous, restart it with the same key,
   SQLite registry and port;
3. ``rebind``: NAT rebinding: the stt service, then the orchestrator, move to a new
   UDP port (``node.rebind()`` on SIGUSR1);
4. ``loss``: bursts of 30 % random UDP loss to and from the llm's port, by an nftables
   rule in a private network namespace (``numgen random mod 100 < 30 drop``).

Every request carries a unique id; each service logs every request it begins, so a
non-idempotent request executed twice anywhere is counted as a duplicate (must be 0).
The report gives, per phase and window: requests sent, succeeded, failed (by reason),
retried (by the transport, in the client or the orchestrator, or by the client for
GETs), duplicated, and p50/p99 latency of successful requests; plus a check that every
request has an outcome (nothing lost silently) and every failure a reason.

Why: the library claims its tunnels survive peer restarts, rendezvous restarts, NAT
rebinding and loss, and that it re-sends only requests the server never began. This
measures what an application actually sees under those faults.

How to run (root, for the network namespace and the loss phase; without root it runs
in the current namespace and skips the loss phase, saying so)::

    .venv/bin/python benchmarks/soak_pipeline.py                 # ~2.5 minutes
    .venv/bin/python benchmarks/soak_pipeline.py --quick         # ~1 minute, for smoke tests
    .venv/bin/python benchmarks/soak_pipeline.py --json soak.json --workdir /tmp/soak

Exit status: 0 when no non-idempotent request was duplicated, none was lost silently,
every failure has a reason and the soak itself ran; 1 otherwise; 2 on bad options;
130 on Ctrl-C. Failures under faults are reported, not fatal. Every process and the
namespace are removed on exit, on Ctrl-C and on SIGTERM. The machine is a shared
2-core VM: compare windows within one run rather than absolute figures across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
from _soak_common import die_with_parent
from _soak_report import (
    Logs,
    Phase,
    Window,
    analyse,
    normalise,
    phase_table,
    read_logs,
    recovery_table,
    service_table,
    summary_table,
)
from anyio.abc import Process, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NODE_ROLES = ("stt", "llm", "image", "orchestrator")
ALL_ROLES = ("rendezvous", *NODE_ROLES)
NETNS_PORTS = {"rendezvous": 9000, "stt": 7001, "llm": 7002, "image": 7003, "orchestrator": 7004}
READY_TIMEOUT = 30.0
NFT_TABLE = "overlay_soak"
FAULTS = ("kill-llm", "restart-rendezvous", "rebind", "loss")


# -- the outer process: a private network namespace -----------------------------------------


def netns_unavailable() -> str | None:
    """Why a private network namespace cannot be made here (None if it can)."""
    if sys.platform != "linux":
        return "not Linux"
    if os.geteuid() != 0:
        return "not root"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed"
    return None


def in_private_netns(name: str) -> bool:
    """True when this process runs in network namespace `name` (never firewall the host's)."""
    if not name:
        return False
    found = subprocess.run(
        ["ip", "netns", "identify", str(os.getpid())], capture_output=True, text=True
    )
    return found.returncode == 0 and found.stdout.split() == [name]


def run_in_netns(argv: Sequence[str]) -> int:
    """Make a namespace, run this script inside it, remove everything afterwards."""
    name = f"overlay-soak-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    child: subprocess.Popen[bytes] | None = None
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGKILL if len(received) > 2 else signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        command = ["ip", "netns", "exec", name, sys.executable, str(Path(__file__).resolve())]
        child = subprocess.Popen([*command, *argv, "--in-netns", name], start_new_session=True)
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        # Whatever still runs in the namespace was started by us: end it by pid.
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=False)


# -- child processes -------------------------------------------------------------------------


@dataclass
class Child:
    """One process of the soak: stdin is its lifeline, stdout its JSON lines."""

    role: str
    process: Process
    ready_info: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    ready: anyio.Event = field(default_factory=anyio.Event)
    changed: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)

    async def read(self) -> None:
        """Read the child's JSON lines until it exits."""
        assert self.process.stdout is not None
        stream = BufferedByteReceiveStream(self.process.stdout)
        try:
            while True:
                line = await stream.receive_until(b"\n", 1 << 20)
                try:
                    item = json.loads(line)
                except ValueError:
                    continue
                if item.get("ready"):
                    self.ready_info = item
                    self.ready.set()
                else:
                    self.events.append(item)
                changed, self.changed = self.changed, anyio.Event()
                changed.set()
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
            pass
        finally:
            self.done.set()
            self.changed.set()

    async def wait_ready(self, seconds: float = READY_TIMEOUT) -> dict[str, Any]:
        with anyio.move_on_after(seconds):
            while not self.ready.is_set() and not self.done.is_set():
                await self.changed.wait()
        if self.ready_info is None:
            code = self.process.returncode
            raise RuntimeError(f"{self.role} was not ready after {seconds:.0f} s (exit {code})")
        return self.ready_info

    async def wait_event(self, name: str, after: int, seconds: float) -> dict[str, Any] | None:
        with anyio.move_on_after(seconds):
            while True:
                for item in self.events[after:]:
                    if item.get("event") == name:
                        return item
                if self.done.is_set():
                    return None
                await self.changed.wait()
        return None

    async def stop(self, grace: float = 10.0) -> int | None:
        """Close stdin (a clean stop), then SIGTERM, then SIGKILL; the exit code."""
        process = self.process
        if process.returncode is None and process.stdin is not None:
            with contextlib.suppress(Exception):
                await process.stdin.aclose()
        with anyio.move_on_after(grace):
            await process.wait()
        if process.returncode is None:
            process.terminate()
            with anyio.move_on_after(3.0):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        with contextlib.suppress(Exception):
            await process.aclose()
        return process.returncode


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


# -- the soak ---------------------------------------------------------------------------------


class Soak:
    """Starts the processes, runs the phases, injects the faults, stops everything."""

    def __init__(self, args: argparse.Namespace, workdir: Path, tg: TaskGroup) -> None:
        self.args = args
        self.workdir = workdir
        self.tg = tg
        self.children: dict[str, Child] = {}
        self.binds = dict(NETNS_PORTS) if args.in_netns else {r: free_udp_port() for r in ALL_ROLES}
        self.ports = dict(self.binds)  # where each node is now (a rebinding moves it)
        self.spec = ""
        self.stderr_files: dict[str, IO[bytes]] = {}
        self.loss_active = False
        self.codes: list[tuple[str, int | None]] = []  # every stopped process's exit code
        self.resets = 0

    # processes

    def command(self, role: str) -> list[str]:
        key = str(self.workdir / f"{role}.key")
        bind = f"127.0.0.1:{self.binds[role]}"
        script = str(HERE / "_soak_node.py")
        if role == "rendezvous":
            db = str(self.workdir / "registry.db")
            return [sys.executable, script, role, "--bind", bind, "--identity", key, "--db", db]
        command = [sys.executable, script, role, "--bind", bind, "--identity", key]
        command += ["--rendezvous", self.spec, "--exec-log", str(self.workdir / f"{role}.exec")]
        command += ["--compute-ms", str(self.args.compute_ms)]
        command += ["--stage-timeout", str(self.args.stage_timeout)]
        if role == "orchestrator":
            command += ["--retry-log", str(self.workdir / "orchestrator.retries")]
        return command

    def stderr_file(self, role: str) -> IO[bytes]:
        """The file a role's stderr goes to (appended to across restarts)."""
        if role not in self.stderr_files:
            self.stderr_files[role] = open(self.workdir / f"{role}.stderr", "ab")  # noqa: SIM115
        return self.stderr_files[role]

    async def spawn(self, role: str, command: list[str]) -> Child:
        process = await anyio.open_process(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr_file(role),
            cwd=ROOT,
            start_new_session=True,  # Ctrl-C is the soak's to handle
        )
        child = Child(role, process)
        self.children[role] = child
        self.tg.start_soon(child.read)
        return child

    async def start(self, role: str) -> Child:
        child = await self.spawn(role, self.command(role))
        info = await child.wait_ready()
        self.ports[role] = self.binds[role]
        if role == "rendezvous":
            self.spec = info["spec"]
        return child

    async def start_all(self) -> None:
        self.ports = dict(self.binds)
        step("starting rendezvous")
        await self.start("rendezvous")
        print(f"ok  {self.spec.split('@')[1]}")
        step("starting stt, llm, image")
        services = [await self.spawn(r, self.command(r)) for r in ("stt", "llm", "image")]
        for child in services:
            await child.wait_ready()
        print("ok")
        step("starting orchestrator")
        await self.start("orchestrator")
        print("ok")
        step(f"starting load ({self.args.rate:g} chains/s, {self.args.health_rate:g} GETs/s)")
        command = [sys.executable, str(HERE / "_soak_load.py"), "--rendezvous", self.spec]
        command += ["--out", str(self.workdir / "load.jsonl"), "--rate", str(self.args.rate)]
        command += ["--health-rate", str(self.args.health_rate)]
        command += ["--timeout", str(self.args.timeout)]
        if self.resets:  # request ids stay unique across load generators
            command += ["--prefix", f"r{self.resets}-"]
        await (await self.spawn("load", command)).wait_ready()
        print("ok")

    async def stop_all(self, *, hurry: bool = False) -> None:
        """Stop the load generator (it drains its requests), then the pipeline, in order.

        With `hurry` (Ctrl-C) the load generator gets 5 s to drain, not a full timeout.
        """
        for role in ("load", "orchestrator", "image", "llm", "stt", "rendezvous"):
            child = self.children.pop(role, None)
            if child is not None:
                grace = 10.0
                if role == "load" and not hurry:
                    grace = self.args.timeout + 15.0
                self.codes.append((role, await child.stop(grace)))

    def close(self) -> None:
        for file in self.stderr_files.values():
            file.close()

    async def reset(self) -> None:
        """Restart every process (same keys, ports and registry) and a new load generator."""
        step("  not recovered: restarting every process")
        await self.stop_all()
        self.resets += 1
        print("stopped")
        await self.start_all()

    # faults

    async def kill_and_restart(self, role: str, events: list[tuple[float, str]]) -> None:
        child = self.children[role]
        child.process.kill()  # SIGKILL, by the pid of the process we started
        await child.process.wait()
        with contextlib.suppress(Exception):
            await child.process.aclose()
        events.append((time.time(), f"{role} (pid {child.process.pid}) killed with SIGKILL"))
        await anyio.sleep(self.args.down)
        started = time.time()
        new = await self.start(role)
        events.append(
            (
                time.time(),
                f"{role} restarted (pid {new.process.pid}), ready "
                f"{time.time() - started:.1f} s after its start",
            )
        )

    async def fault_kill_llm(self, events: list[tuple[float, str]]) -> None:
        await self.kill_and_restart("llm", events)

    async def fault_restart_rendezvous(self, events: list[tuple[float, str]]) -> None:
        await self.kill_and_restart("rendezvous", events)

    async def fault_rebind(self, events: list[tuple[float, str]]) -> None:
        targets = self.args.rebind
        gap = self.args.fault / max(1, len(targets))
        for i, role in enumerate(targets):
            if i:
                await anyio.sleep(gap)
            child = self.children[role]
            mark = len(child.events)
            os.kill(child.process.pid, signal.SIGUSR1)
            event = await child.wait_event("rebound", mark, seconds=10.0)
            if event is None:
                events.append((time.time(), f"{role} did not confirm its rebinding"))
            else:
                self.ports[role] = int(event["endpoint"].rsplit(":", 1)[1])
                events.append(
                    (time.time(), f"{role} rebound from {event['before']} to {event['endpoint']}")
                )

    async def fault_loss(self, events: list[tuple[float, str]]) -> None:
        role = self.args.loss_target
        port = self.ports[role]
        nft(f"add table inet {NFT_TABLE}")
        chain = "{ type filter hook input priority 0; policy accept; }"
        nft(f"add chain inet {NFT_TABLE} loss {chain}")
        percent = self.args.loss_percent
        for burst in range(self.args.loss_bursts):
            if burst:
                await anyio.sleep(self.args.loss_gap)
            for direction in ("dport", "sport"):
                nft(
                    f"add rule inet {NFT_TABLE} loss udp {direction} {port} "
                    f"numgen random mod 100 < {percent} counter drop"
                )
            self.loss_active = True
            events.append((time.time(), f"{percent} % loss on UDP port {port} ({role}) on"))
            await anyio.sleep(self.args.loss_burst)
            dropped = nft_dropped()
            nft(f"flush chain inet {NFT_TABLE} loss")
            self.loss_active = False
            events.append((time.time(), f"loss off ({dropped} datagrams dropped)"))

    # phases

    async def run_phase(
        self,
        number: int,
        name: str,
        title: str,
        action: Callable[[list[tuple[float, str]]], Awaitable[None]],
    ) -> Phase:
        """Lead-in, fault, recovery window; then wait to be healthy, or restart everything."""
        args = self.args
        events: list[tuple[float, str]] = []
        lead_in = time.time()  # chains started from here on are in flight when the fault hits
        await anyio.sleep(args.lead_in)
        inject = time.time()
        print(f"phase {number}/{len(args.faults)} {name}: {title}", flush=True)
        await action(events)
        fault_end = max(inject + args.fault, time.time() + 1.0)
        await anyio.sleep(fault_end - time.time())
        await anyio.sleep(args.recovery)
        end = time.time()
        windows = [
            Window(name, "fault", lead_in, fault_end),
            Window(name, "recovery", fault_end, end),
        ]
        phase = Phase(name, title, windows, events, inject=inject)
        self.progress(phase)
        healthy = self.healthy()
        for _ in range(int(args.settle / 0.5)):  # poll the load generator's records
            if healthy:
                break
            await anyio.sleep(0.5)
            healthy = self.healthy()
        phase.settled_s = round(time.time() - end, 1) if healthy else None
        if phase.settled_s is None:
            phase.events.append((time.time(), f"not healthy {time.time() - inject:.0f} s after"))
            if args.reset and number < len(args.faults):
                await self.reset()
                phase.reset = True
                phase.events.append((time.time(), "every process restarted for the next phase"))
        return phase

    def healthy(self) -> bool:
        """Did every chain started 5 to 2.5 s ago succeed (and is there at least one)?"""
        logs = read_logs(self.workdir, ())
        now = time.time()
        recent = [
            s
            for s in logs.starts.values()
            if s["kind"] == "chain" and now - 5 <= s["t"] < now - 2.5
        ]
        return bool(recent) and all(
            logs.ends.get(s["id"], {}).get("outcome") == "ok" for s in recent
        )

    def progress(self, phase: Phase) -> None:
        """One line per window, from what the load generator has recorded so far."""
        logs = read_logs(self.workdir, ())
        for t, what in phase.events:
            print(f"    {t - phase.inject:+5.1f} s  {what}")
        for window in phase.windows:
            chains = [
                r
                for r in logs.ends.values()
                if r["kind"] == "chain" and window.start <= r["t0"] < window.end
            ]
            ok = sorted(r["ms"] for r in chains if r["outcome"] == "ok")
            p99 = ok[min(len(ok) - 1, int(len(ok) * 0.99))] if ok else None
            print(
                f"  {window.kind:<8} {window.seconds:4.1f} s: {len(chains)} chains ended so far, "
                f"{len(ok)} ok, {len(chains) - len(ok)} failed, p99 {ms(p99)}",
                flush=True,
            )


def step(text: str) -> None:
    print(f"{text}...", end=" ", flush=True)


_NETNS: list[str] = []  # the soak's private namespace, once checked


def nft(command: str) -> None:
    """Run one nft command in this (private) namespace; refuse in the host's."""
    if not _NETNS or not in_private_netns(_NETNS[0]):
        raise RuntimeError("refusing to run nft outside the soak's private network namespace")
    subprocess.run(["nft", *command.split()], check=True)


def nft_dropped() -> int:
    out = subprocess.run(
        ["nft", "list", "chain", "inet", NFT_TABLE, "loss"], capture_output=True, text=True
    ).stdout
    total = 0
    words = out.split()
    for i, word in enumerate(words):
        if word == "packets" and i + 1 < len(words) and words[i + 1].isdigit():
            total += int(words[i + 1])
    return total


TITLES = {
    "kill-llm": "SIGKILL the llm service, restart it (same key, port, tags, hostname)",
    "restart-rendezvous": "SIGKILL the rendezvous, restart it (same key, registry, port)",
    "rebind": "NAT rebinding: {targets} move to a new UDP port",
    "loss": "{bursts} bursts of {percent} % UDP loss to and from {target}'s port",
}


async def soak(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], int]:
    """Run the whole soak; return the report and the exit status."""
    phases: list[Phase] = []
    status = 0
    received: list[int] = []
    baseline = Window("baseline", "baseline", 0.0, 0.0)
    error: str | None = None
    started = time.time()
    load_before = os.getloadavg()
    async with anyio.create_task_group() as tg:
        runner = Soak(args, workdir, tg)

        async def on_signal(scope: anyio.CancelScope) -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    received.append(signum)
                    scope.cancel()
                    return

        try:
            with anyio.CancelScope() as scope:
                tg.start_soon(on_signal, scope)
                await runner.start_all()
                t0 = time.time()
                print(f"baseline: {args.warmup:g} s of steady load", flush=True)
                await anyio.sleep(args.warmup)
                skip = min(2.0, args.warmup / 4)  # the first requests open tunnels
                baseline = Window("baseline", "baseline", t0 + skip, time.time())
                actions = {
                    "kill-llm": runner.fault_kill_llm,
                    "restart-rendezvous": runner.fault_restart_rendezvous,
                    "rebind": runner.fault_rebind,
                    "loss": runner.fault_loss,
                }
                for number, name in enumerate(args.faults, 1):
                    title = TITLES[name].format(
                        targets=" then ".join(args.rebind),
                        bursts=args.loss_bursts,
                        percent=args.loss_percent,
                        target=args.loss_target,
                    )
                    if name == "loss" and not args.in_netns:
                        why = args.no_netns_reason or "no private network namespace"
                        print(f"phase {number}/{len(args.faults)} loss: SKIPPED ({why})")
                        phases.append(Phase(name, title, [], [], skipped=why))
                        continue
                    phases.append(await runner.run_phase(number, name, title, actions[name]))
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            print(f"\nerror: {error}", file=sys.stderr)
            status = 1
        finally:
            with anyio.CancelScope(shield=True):
                if runner.loss_active:
                    with contextlib.suppress(Exception):
                        nft(f"flush chain inet {NFT_TABLE} loss")
                step("\nstopping load (draining requests in flight), orchestrator, services")
                await runner.stop_all(hurry=bool(received))
                runner.close()
                print("ok")
        tg.cancel_scope.cancel()
    logs = read_logs(workdir, NODE_ROLES)
    analysis = analyse(logs, phases, baseline)
    report = build_report(args, workdir, phases, baseline, analysis, runner.codes, logs)
    report["resets"] = runner.resets
    report["error"] = error
    report["elapsed_s"] = round(time.time() - started, 1)
    report["environment"]["loadavg_before"] = load_before
    report["environment"]["loadavg_after"] = os.getloadavg()
    print_report(report, phases)
    verdict = report["verdict"]
    if not verdict["passed"]:
        status = 1
    if received:
        print(f"interrupted by {signal.Signals(received[0]).name}", file=sys.stderr)
        status = 128 + received[0]
    return report, status


def stderr_summary(workdir: Path) -> dict[str, Any]:
    """Warnings and errors the processes logged: lines per process, commonest messages."""
    per_role: dict[str, int] = {}
    common: Counter[str] = Counter()
    for path in sorted(workdir.glob("*.stderr")):
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        per_role[path.stem] = len(lines)
        for line in lines:
            if line.startswith(("Traceback", " ")):
                continue
            common[normalise(line, 160)] += 1
    return {"lines": per_role, "commonest": common.most_common(8)}


def build_report(
    args: argparse.Namespace,
    workdir: Path,
    phases: Sequence[Phase],
    baseline: Window,
    analysis: dict[str, Any],
    codes: Sequence[tuple[str, int | None]],
    logs: Logs,
) -> dict[str, Any]:
    total_post = analysis["total"]["POST /chain"]
    total_get = analysis["total"]["GET /health"]
    duplicated = sum(d["extra_executions"] for d in analysis["per_service"].values())
    reasonless = total_post["failed_without_reason"] + total_get["failed_without_reason"]
    stopped_badly = [(r, c) for r, c in codes if c not in (0, None)]
    loads = [c for r, c in codes if r == "load"]
    checks = {
        "no duplicated non-idempotent request": duplicated == 0,
        "every request has an outcome (nothing lost silently)": not analysis["unanswered"],
        "every failure has a reason": reasonless == 0,
        "load generator finished cleanly": bool(loads) and all(c == 0 for c in loads),
        "phases ran": len(phases) == len(args.faults),
    }
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/soak_pipeline.py", *args.argv]),
        "config": {
            k: v for k, v in vars(args).items() if k not in ("argv", "no_netns_reason", "json")
        },
        "environment": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "network_namespace": args.in_netns or None,
        },
        "baseline": {"start": baseline.start, "end": baseline.end},
        "phases": [
            {
                "name": p.name,
                "title": p.title,
                "skipped": p.skipped,
                "inject": p.inject,
                "events": [
                    {"t": t, "offset_s": round(t - p.inject, 2), "what": what}
                    for t, what in p.events
                ],
                "windows": [
                    {"kind": w.kind, "start": w.start, "end": w.end, "seconds": round(w.seconds, 2)}
                    for w in p.windows
                ],
                "recovery": analysis["recovery"].get(p.name),
                "healthy_after_recovery_window_s": p.settled_s,
                "reset_after": p.reset,
            }
            for p in phases
        ],
        "results": analysis["windows"],
        "recovery": analysis["recovery"],
        "total": analysis["total"],
        "per_service": analysis["per_service"],
        "unanswered": analysis["unanswered"],
        "exit_codes": codes,
        "stopped_badly": stopped_badly,
        "stderr": stderr_summary(workdir),
        "requests_recorded": len(logs.ends),
        "verdict": {"checks": checks, "passed": all(checks.values())},
    }


def print_report(report: dict[str, Any], phases: Sequence[Phase]) -> None:
    results = report["results"]
    print("\n## Baseline (steady load, no fault)\n")
    print(phase_table([r for r in results if r["phase"] == "baseline"]))
    for number, phase in enumerate(phases, 1):
        print(f"\n## Phase {number}: {phase.name}: {phase.title}\n")
        if phase.skipped:
            print(f"Skipped: {phase.skipped}.")
            continue
        for t, what in phase.events:
            print(f"- {t - phase.inject:+.1f} s: {what}")
        print()
        print(phase_table([r for r in results if r["phase"] == phase.name]))
    print("\n## Summary (POST /chain)\n")
    print(summary_table(results))
    print("\n## Recovery (seconds from the injection; chains by start time)\n")
    print(recovery_table(phases, report["recovery"]))
    print("\n## Executions per service (duplicates are POST ids executed more than once)\n")
    print(service_table(report["per_service"]))
    total = report["total"]
    for cls, t in total.items():
        print(
            f"\n{cls}: {t['sent']} sent, {t['ok']} ok, {t['failed']} failed, "
            f"{t['retried']} retried, {t['duplicated'] if cls == 'POST /chain' else 'n/a'} "
            f"duplicated, p50 {ms(t['p50_ms'])}, p99 {ms(t['p99_ms'])}"
        )
    stderr = report["stderr"]
    if any(stderr["lines"].values()):
        lines = ", ".join(f"{r} {n}" for r, n in stderr["lines"].items() if n)
        print(f"\nstderr lines: {lines}; commonest:")
        for line, n in stderr["commonest"]:
            print(f"  {n} x {line}")
    if report["stopped_badly"]:
        print(f"\nexit codes other than 0: {report['stopped_badly']}")
    print("\nchecks:")
    for check, passed in report["verdict"]["checks"].items():
        print(f"  [{'ok' if passed else 'FAILED'}] {check}")
    if report["unanswered"]:
        print(f"  requests without an outcome: {', '.join(report['unanswered'][:10])}")
    print(f"\n{'PASSED' if report['verdict']['passed'] else 'FAILED'} in {report['elapsed_s']} s")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/soak_pipeline.py",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="short phases (~1 minute in all)")
    p.add_argument("--rate", type=float, default=20.0, help="POST /chain per second")
    p.add_argument("--health-rate", type=float, default=4.0, help="GET /health per second")
    p.add_argument("--compute-ms", type=float, default=100.0, help="stand-in compute per model")
    p.add_argument("--warmup", type=float, default=None, help="baseline seconds (20; quick 5)")
    p.add_argument("--fault", type=float, default=None, help="fault window seconds (10; quick 4)")
    p.add_argument("--recovery", type=float, default=None, help="recovery seconds (20; quick 5)")
    p.add_argument("--down", type=float, default=None, help="seconds a killed process stays down")
    p.add_argument("--faults", default=",".join(FAULTS), help="which faults, in order")
    p.add_argument("--rebind", default="stt,orchestrator", help="nodes that rebind, in order")
    p.add_argument("--loss-target", default="llm", choices=NODE_ROLES)
    p.add_argument("--loss-percent", type=int, default=30)
    p.add_argument("--loss-bursts", type=int, default=None, help="bursts (3; quick 2)")
    p.add_argument(
        "--loss-burst", type=float, default=None, help="seconds per burst (2.5; quick 1.5)"
    )
    p.add_argument("--loss-gap", type=float, default=1.0, help="seconds between bursts")
    p.add_argument(
        "--lead-in",
        type=float,
        default=1.0,
        help="seconds before each fault that count in its fault window (chains in flight)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=None,
        help="after a recovery window, seconds to wait for healthy chains (10; quick 4)",
    )
    p.add_argument(
        "--no-reset",
        dest="reset",
        action="store_false",
        help="do not restart every process when a phase did not recover",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="client timeout per attempt")
    p.add_argument("--stage-timeout", type=float, default=10.0, help="orchestrator's timeout")
    p.add_argument("--netns", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--workdir", help="keep keys, logs and the registry here (default: a temp dir)")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--in-netns", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    if "--in-netns" in raw:
        i = raw.index("--in-netns")
        del raw[i : i + 2]
    args.argv = raw
    quick = args.quick
    defaults = {
        "warmup": (20.0, 5.0),
        "fault": (10.0, 4.0),
        "recovery": (20.0, 5.0),
        "down": (2.0, 1.0),
        "loss_bursts": (3, 2),
        "loss_burst": (2.5, 1.5),
        "settle": (10.0, 4.0),
    }
    for key, (full, short) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, short if quick else full)
    args.faults = [f for f in args.faults.split(",") if f]
    unknown = [f for f in args.faults if f not in FAULTS]
    if unknown:
        p.error(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
    args.rebind = [r for r in args.rebind.split(",") if r]
    if any(r not in NODE_ROLES for r in args.rebind):
        p.error(f"--rebind takes nodes among {', '.join(NODE_ROLES)}")
    if not 0 < args.loss_percent <= 100 or args.rate <= 0:
        p.error("--loss-percent must be in 1..100 and --rate > 0")
    if args.in_netns:
        if not in_private_netns(args.in_netns):
            p.error(f"--in-netns is internal, and this is not network namespace {args.in_netns}")
        _NETNS.append(args.in_netns)
    args.no_netns_reason = None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.in_netns and args.netns != "no":
        why = netns_unavailable()
        if why is None:
            return run_in_netns(args.argv)
        if args.netns == "yes":
            print(f"soak: cannot make a network namespace ({why})", file=sys.stderr)
            return 2
        args.no_netns_reason = f"needs a private network namespace: {why}"
        print(
            f"soak: running in the current network namespace ({why}); "
            "the loss phase will be skipped",
            file=sys.stderr,
        )
    elif args.netns == "no":
        args.no_netns_reason = "--netns no"
    if args.in_netns:
        die_with_parent()
        print(f"in network namespace {args.in_netns} (loopback up)")
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            for stale in [*workdir.glob("*.exec"), *workdir.glob("*.stderr")]:
                stale.unlink()
            for name in ("load.jsonl", "orchestrator.retries", "registry.db"):
                (workdir / name).unlink(missing_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="overlay-soak-")))
        try:
            report, status = anyio.run(soak, args, workdir)
        except KeyboardInterrupt:
            return 130
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"report written to {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
