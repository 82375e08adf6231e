"""What every process of the pipeline demo shares: settings, command line, the node's life.

Each service is an ordinary FastAPI app. `run_node` puts one on an overlay `Node`
registered at a rendezvous under tags and a hostname, prints one JSON line on stdout
once it is registered *and* serving (what the one-command runner waits for, instead of
polling), and stops cleanly on SIGINT or SIGTERM, or, with ``--exit-with-parent``, when
its stdin closes: a runner that dies, even by SIGKILL, leaves no orphans behind.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Final

import anyio
from fastapi import FastAPI, Response

from overlay_httpx import Identity, Node, serve

COMPUTE_HEADER: Final = "x-compute-ms"
"""Response header in which a model service reports its own compute time, in ms."""
COMPUTE_ENV: Final = "PIPELINE_COMPUTE_MS"
DEFAULT_COMPUTE_MS: Final = 200.0
KINDS: Final = ("stt", "llm", "image")
"""The model services, in pipeline order; each is also its tag and default hostname."""


def compute_seconds(compute_ms: float | None = None) -> float:
    """The stand-in compute delay: `compute_ms`, else ``$PIPELINE_COMPUTE_MS``, else 200 ms."""
    if compute_ms is None:
        compute_ms = float(os.environ.get(COMPUTE_ENV, DEFAULT_COMPUTE_MS))
    if compute_ms < 0:
        raise ValueError(f"compute delay {compute_ms} ms: expected >= 0")
    return compute_ms / 1000.0


def elapsed_ms(started: float) -> float:
    """Milliseconds since `started`, a `time.perf_counter()` reading."""
    return (time.perf_counter() - started) * 1000.0


def report_compute(response: Response, started: float) -> float:
    """Put the compute time since `started` in the response's `x-compute-ms` header."""
    compute = elapsed_ms(started)
    response.headers[COMPUTE_HEADER] = f"{compute:.3f}"
    return compute


def parser(description: str | None, *, compute: bool = True) -> argparse.ArgumentParser:
    """The options every node process takes."""
    p = argparse.ArgumentParser(
        description=(description or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--rendezvous",
        default=os.environ.get("OVERLAY_HTTPX_RENDEZVOUS"),
        required="OVERLAY_HTTPX_RENDEZVOUS" not in os.environ,
        help="HOST:PORT, or IDENTITY@HOST:PORT to pin its key ($OVERLAY_HTTPX_RENDEZVOUS)",
    )
    p.add_argument("--bind", default="127.0.0.1:0", help="local UDP HOST:PORT")
    p.add_argument("--identity", help="key file, created if missing (default: a new key)")
    p.add_argument("--hostname", help="name to register (default: the service kind)")
    p.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    p.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="also stop when stdin closes (the one-command runner uses this)",
    )
    if compute:
        p.add_argument(
            "--compute-ms",
            type=float,
            default=None,
            help=f"stand-in compute delay per request (default ${COMPUTE_ENV} or 200)",
        )
    return p


def announce(**fields: object) -> None:
    """The one JSON line on stdout that says this process is ready."""
    print(json.dumps({"ready": True, "pid": os.getpid(), **fields}), flush=True)


async def stdin_eof() -> None:
    """Return once stdin is at EOF: the parent that holds its other end has gone."""
    fd = sys.stdin.fileno()
    while True:
        await anyio.wait_readable(fd)
        if not os.read(fd, 4096):
            return


async def wait_for_stop(*, watch_stdin: bool) -> None:
    """Return on SIGINT or SIGTERM, or (with `watch_stdin`) once stdin is at EOF."""
    stop = anyio.Event()

    async def on_signal() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                stop.set()
                return

    async def on_stdin_eof() -> None:
        await stdin_eof()
        stop.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(on_signal)
        if watch_stdin:
            tg.start_soon(on_stdin_eof)
        await stop.wait()
        tg.cancel_scope.cancel()


async def run_node(
    make_app: Callable[[Node], FastAPI],
    args: argparse.Namespace,
    *,
    kind: str,
    tags: Sequence[str],
) -> None:
    """Serve ``make_app(node)`` on overlay port 80 of a registered node until told to stop."""
    identity = Identity.load_or_create(args.identity) if args.identity else Identity.generate()
    hostname = args.hostname or kind
    async with (
        Node(
            identity, bind=args.bind, rendezvous=args.rendezvous, tags=tags, hostname=hostname
        ) as node,
        anyio.create_task_group() as tg,
    ):
        await node.wait_registered()
        await tg.start(functools.partial(serve, make_app(node), node))  # lifespan done
        host, port = node.endpoint
        announce(
            name=kind,
            address=str(node.address),
            hostname=hostname,
            tags=list(tags),
            endpoint=f"{host}:{port}",
        )
        await wait_for_stop(watch_stdin=args.exit_with_parent)
        tg.cancel_scope.cancel()  # serve() drains in-flight requests, then the node unregisters


def main_node(
    make_app: Callable[[Node, argparse.Namespace], FastAPI],
    *,
    kind: str,
    tags: Sequence[str],
    description: str | None,
    argv: Sequence[str] | None = None,
    compute: bool = True,
) -> None:
    """The ``python -m examples.pipeline.<kind>`` entry point of a node process."""
    args = parser(description, compute=compute).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{kind}: %(levelname)s %(message)s")
    run = functools.partial(run_node, lambda node: make_app(node, args), args, kind=kind, tags=tags)
    try:
        anyio.run(run, backend=args.backend)
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was installed
        sys.exit(130)


def main_service(
    create_app: Callable[[float | None], FastAPI],
    *,
    kind: str,
    description: str | None,
    argv: Sequence[str] | None = None,
) -> None:
    """Entry point of a model service: tagged ``model-service`` and its kind."""
    main_node(
        lambda _node, args: create_app(args.compute_ms),
        kind=kind,
        tags=["model-service", kind],
        description=description,
        argv=argv,
    )
