"""What the long-running commands share: stopping on signals and the "ready" line.

``serve``, ``gateway`` and ``expose`` run until SIGINT or SIGTERM, then shut
down gracefully by cancelling their work (the server drains in-flight
requests, the node tells its peers). A second signal during that drain exits
at once. Each prints one ``ready`` line on stdout when it can take traffic,
so scripts and tests wait for that line instead of sleeping.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskStatus

from .._node import Node
from ._errors import PROG

__all__ = ["announce", "node_fields", "until_signal"]


async def until_signal(body: Callable[[], Awaitable[None]]) -> int:
    """Run `body` until it returns or a signal arrives; the process's exit code.

    SIGINT cancels `body` and gives 130 (as a shell reports Ctrl-C); SIGTERM
    cancels it and gives 0, since being asked to stop is a clean stop.
    """
    received: list[int] = []
    body_scope = anyio.CancelScope()

    async def watch(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if received:  # a second signal: the user does not want to wait
                    print(f"{PROG}: forced exit", file=sys.stderr, flush=True)
                    os._exit(130 if signum == signal.SIGINT else 143)
                received.append(signum)
                body_scope.cancel()

    async with anyio.create_task_group() as group:
        await group.start(watch)
        with body_scope:
            await body()
        group.cancel_scope.cancel()
    if received and received[0] == signal.SIGINT:
        return 130
    return 0


def node_fields(node: Node, port: int) -> dict[str, object]:
    """The ready line's description of where this node serves `port`."""
    host, udp_port = node.endpoint
    shown_host = f"[{host}]" if ":" in host else host
    url_port = "" if port == 80 else f":{port}"
    return {
        "address": node.address,
        "port": port,
        "url": f"http://{node.address.host}{url_port}/",
        "udp": f"{shown_host}:{udp_port}",
        "identity": node.public,
    }


def announce(command: str, fields: dict[str, object]) -> None:
    """``overlay-httpx COMMAND: ready key=value ...`` on stdout, flushed."""
    pairs = " ".join(f"{key}={value}" for key, value in fields.items())
    print(f"{PROG} {command}: ready {pairs}", flush=True)
