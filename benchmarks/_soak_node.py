"""One process of the fault soak: the rendezvous, a model service or the orchestrator.

Why: the soak (`soak_pipeline.py`) runs the pipeline example's own FastAPI apps
(``examples/pipeline``), but needs three things the example's runner does not do:
each service must log every request it executes by its client-supplied id (to count
duplicates, even across a SIGKILL), a service must move to a new UDP port when told
(SIGUSR1 -> ``await node.rebind()``, a simulated NAT rebinding), and the orchestrator's
stage calls must carry request ids and have their automatic retries counted. So this
runner wraps the example's ``create_app`` in `ExecutionLog` and gives the orchestrator
`CountingTransport` in place of `OverlayTransport` (the example module looks the class
up at start-up, so replacing the module attribute is enough).

Everything else is as in ``examples/pipeline/common.py``: a node registered at the
rendezvous with tags ``model-service,<kind>`` (or ``orchestrator``) and hostname
``<kind>``, the app served on overlay port 80, one JSON line on stdout once ready
(``{"ready": true, ...}``), one per rebinding (``{"event": "rebound", ...}``), and a
clean stop on SIGINT/SIGTERM or when stdin closes (plus PR_SET_PDEATHSIG).

Not run by hand; the soak starts it as
``python benchmarks/_soak_node.py ROLE --bind HOST:PORT --identity KEY [...]``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import signal
import sys
from collections.abc import Sequence
from typing import Any

import anyio
from _soak_common import (
    AppendLog,
    CountingTransport,
    ExecutionLog,
    configure_logging,
    die_with_parent,
    emit,
    repo_root,
)

sys.path.insert(0, str(repo_root()))

from examples.pipeline import orchestrator as orchestrator_module
from examples.pipeline.common import KINDS, wait_for_stop
from overlay_httpx import Identity, Node, Rendezvous, serve

ROLES = ("rendezvous", *KINDS, "orchestrator")


async def on_rebind_signal(node: Node) -> None:
    """SIGUSR1: move the node to a new UDP port, as a NAT rebinding would."""
    with anyio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            before = "{}:{}".format(*node.endpoint)
            await node.rebind()
            emit(event="rebound", before=before, endpoint="{}:{}".format(*node.endpoint))


async def run_rendezvous(args: argparse.Namespace) -> None:
    identity = Identity.load_or_create(args.identity)
    async with Rendezvous(identity, bind=args.bind, db=args.db) as rv:
        emit(ready=True, name="rendezvous", spec=rv.spec, endpoint="{}:{}".format(*rv.endpoint))
        await wait_for_stop(watch_stdin=True)


async def run_node(args: argparse.Namespace) -> None:
    role: str = args.role
    log = AppendLog(args.exec_log)
    if role == "orchestrator":
        if args.retry_log:
            CountingTransport.retry_log = AppendLog(args.retry_log)
        orchestrator_module.OverlayTransport = CountingTransport  # type: ignore[attr-defined]
        tags = ["orchestrator"]
    else:
        tags = ["model-service", role]
    identity = Identity.load_or_create(args.identity)
    async with (
        Node(
            identity, bind=args.bind, rendezvous=args.rendezvous, tags=tags, hostname=role
        ) as node,
        anyio.create_task_group() as tg,
    ):
        await node.wait_registered()
        app: Any
        if role == "orchestrator":
            app = orchestrator_module.create_app(node, timeout=args.stage_timeout)
        else:
            module = importlib.import_module(f"examples.pipeline.{role}")
            app = module.create_app(args.compute_ms)
        await tg.start(functools.partial(serve, ExecutionLog(app, log), node))
        tg.start_soon(on_rebind_signal, node)
        emit(
            ready=True,
            name=role,
            address=str(node.address),
            endpoint="{}:{}".format(*node.endpoint),
        )
        await wait_for_stop(watch_stdin=True)
        tg.cancel_scope.cancel()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="one process of the fault soak (not run by hand)")
    p.add_argument("role", choices=ROLES)
    p.add_argument("--bind", required=True, help="UDP HOST:PORT")
    p.add_argument("--identity", required=True, help="key file (created if missing)")
    p.add_argument("--rendezvous", help="IDENTITY@HOST:PORT (nodes)")
    p.add_argument("--db", help="SQLite registry (rendezvous)")
    p.add_argument("--exec-log", help="file to append executed requests to (nodes)")
    p.add_argument("--retry-log", help="file to append automatic retries to (orchestrator)")
    p.add_argument("--compute-ms", type=float, default=100.0)
    p.add_argument("--stage-timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    if args.role == "rendezvous" and not args.db:
        p.error("the rendezvous needs --db")
    if args.role != "rendezvous" and not (args.rendezvous and args.exec_log):
        p.error("nodes need --rendezvous and --exec-log")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    die_with_parent()
    args = parse_args(argv)
    configure_logging(args.role)
    run = run_rendezvous if args.role == "rendezvous" else run_node
    try:
        anyio.run(run, args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
