"""One overlay role in a network namespace, driven by the NAT tests.

    python _nat_overlay_peer.py rendezvous HOST:PORT
    python _nat_overlay_peer.py server SPEC
    python _nat_overlay_peer.py client SPEC ADDRESS

Each prints one JSON line when ready (or with its result) and, except the
client, keeps running until its stdin closes.
"""

from __future__ import annotations

import json
import sys

import anyio
import anyio.abc

from overlay_httpx import Identity, Node, OverlayAttribute, OverlayStream, Rendezvous


def emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def until_stdin_closes() -> None:
    await anyio.to_thread.run_sync(sys.stdin.read)


async def rendezvous(bind: str) -> None:
    # Bound to the public address, not 0.0.0.0: on a host with several addresses an
    # unbound UDP socket answers from the outgoing interface's address, which no NAT
    # would match to the request.
    async with Rendezvous(bind=bind) as rv:
        emit({"identity": str(rv.public)})
        await until_stdin_closes()


async def upper(stream: OverlayStream) -> None:
    async with stream:
        data = await stream.receive()
        await stream.send(data.upper())


async def server(spec: str) -> None:
    async with Node(Identity.generate(), bind="0.0.0.0:0", rendezvous=spec) as node:
        listener = await node.listen(80)
        stats = node.statistics()
        emit(
            {
                "address": str(node.address),
                "registered": stats.registered,
                "observed": stats.observed_endpoint,
            }
        )
        async with anyio.create_task_group() as group:
            group.start_soon(listener.serve, upper)
            await until_stdin_closes()
            group.cancel_scope.cancel()


async def client(spec: str, address: str) -> None:
    async with Node(Identity.generate(), bind="0.0.0.0:0", rendezvous=spec) as node:
        start = anyio.current_time()
        with anyio.fail_after(10):
            stream = await node.connect(address, 80)
            await stream.send(b"through the nat")
            answer = await stream.receive()
        emit(
            {
                "answer": answer.decode(),
                "path": stream.extra(OverlayAttribute.path),
                "seconds": anyio.current_time() - start,
                "observed": node.statistics().observed_endpoint,
            }
        )
        await stream.aclose()


def main() -> None:
    role, *args = sys.argv[1:]
    work = {"rendezvous": rendezvous, "server": server, "client": client}[role]
    anyio.run(work, *args)


if __name__ == "__main__":
    main()
