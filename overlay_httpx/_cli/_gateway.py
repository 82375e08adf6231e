"""``overlay-httpx gateway``: a local TCP port that leads to an overlay port.

Each accepted TCP connection gets its own overlay stream to the target and
the bytes are piped both ways (`pipe`), so any TCP protocol crosses: HTTP/2
with prior knowledge reaches an app served with ``overlay-httpx serve``
(``curl --http2-prior-knowledge``), and a raw protocol reaches a raw
listener. A connection that cannot reach the peer is closed and logged; the
gateway itself keeps running.
"""

from __future__ import annotations

import argparse
import functools
import logging

import anyio
from anyio.abc import ByteStream, SocketAttribute, TaskStatus

from .._address import Address
from .._exceptions import HandshakeTimeout, OverlayError, TunnelError, UnknownPeer
from .._http._resolver import NodeResolver
from .._http._transport import Resolver
from .._node import Node, OverlayStream
from ._common import (
    add_node_options,
    command_parser,
    overlay_target,
    rendezvous_of,
    require_known_peer,
    running_node,
    tcp_endpoint,
)
from ._errors import CliError, UsageError
from ._pipe import abort, pipe
from ._runtime import announce, node_fields, until_signal

__all__ = ["add_parser", "handle_connection", "serve_gateway"]

logger = logging.getLogger("overlay_httpx.cli")

DESCRIPTION = """\
Listen on a local TCP port and forward every connection to an overlay port of
a peer, one overlay stream per connection, bytes piped both ways with
half-close. Local tools that cannot load Python reach overlay services this
way: the ASGI bridge speaks HTTP/2 with prior knowledge, so curl
--http2-prior-knowledge (or httpx with http2=True, http1=False) talks to an
app served with 'overlay-httpx serve'. One line, 'overlay-httpx gateway: ready
listen=HOST:PORT to=ADDRESS:PORT ...', is printed on stdout when connections
are accepted."""

EXAMPLES = """\
examples:
  overlay-httpx gateway --listen 127.0.0.1:8080 --to 1:0001.0001.0001 \\
      --peer 1:0001.0001.0001=ovid1_...@192.0.2.7:4000
  curl --http2-prior-knowledge http://127.0.0.1:8080/health
  overlay-httpx gateway --listen 127.0.0.1:5432 --to 1:0001.0001.0001:5432 --peer ...
"""


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
) -> None:
    parser = command_parser(
        subparsers,
        parents,
        "gateway",
        "forward a local TCP port to an overlay port",
        DESCRIPTION,
        EXAMPLES,
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        type=tcp_endpoint,
        default=("127.0.0.1", 8080),
        help="local TCP address to accept on (default: 127.0.0.1:8080; port 0 for any)",
    )
    parser.add_argument(
        "--to",
        metavar="ADDRESS[:PORT]",
        type=overlay_target,
        required=True,
        help="overlay address and port to forward to (port default: 80); with --rendezvous "
        "also NAME.overlay or TAG.tag.overlay, looked up for each connection",
    )
    add_node_options(parser)
    parser.set_defaults(run=run)


async def _connect(
    node: Node, resolver: Resolver, target: Address | str, port: int
) -> OverlayStream:
    """A stream to `target`: an address, or each node a name or tag resolves to in turn."""
    if isinstance(target, Address):
        return await node.connect(target, port)
    addresses = await resolver.resolve(target)
    if not addresses:
        raise UnknownPeer(f"no live node is registered as {target}", port=port)
    for address in addresses[:-1]:
        try:
            return await node.connect(address, port)
        except (UnknownPeer, HandshakeTimeout) as exc:
            logger.debug("%s: %s failed (%s), trying the next node", target, address, exc)
    return await node.connect(addresses[-1], port)


async def handle_connection(
    node: Node,
    target: Address | str,
    port: int,
    tcp: ByteStream,
    *,
    resolver: Resolver | None = None,
) -> None:
    """Pipe one accepted connection to a new overlay stream; never raises on failures.

    A `target` given as text (``llm.overlay``, ``gpu.tag.overlay``) is looked
    up through `resolver` (default: the node's rendezvous) for each connection.
    """
    remote = tcp.extra(SocketAttribute.remote_address, None)
    client = f"{remote[0]}:{remote[1]}" if isinstance(remote, tuple) else str(remote)
    where = f"{target} port {port}"
    try:
        overlay = await _connect(node, resolver or NodeResolver(node), target, port)
    except (OverlayError, OSError) as exc:
        logger.warning("connection from %s: cannot reach %s: %s", client, where, exc)
        await abort(tcp)
        return
    except BaseException:  # cancelled while connecting
        await abort(tcp)
        raise
    result = await pipe(tcp, overlay)
    if isinstance(result.error, TunnelError):
        logger.warning("connection from %s to %s failed: %s", client, where, result.error)
    elif result.error is not None:
        logger.debug("connection from %s to %s ended: %r", client, where, result.error)


async def serve_gateway(
    node: Node,
    target: Address | str,
    port: int,
    *,
    listen: tuple[str, int] = ("127.0.0.1", 8080),
    resolver: Resolver | None = None,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Accept TCP on `listen` and forward each connection until cancelled.

    ``task_status.started()`` receives the bound (host, port), useful with port 0.
    """
    host, local_port = listen
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=local_port)
    except OSError as exc:
        raise CliError(
            f"cannot listen on TCP {host}:{local_port}: {exc.strerror or exc} "
            "(choose another --listen HOST:PORT)"
        ) from None
    async with listener:
        bound = listener.extra(SocketAttribute.local_address)
        assert isinstance(bound, tuple)
        task_status.started((str(bound[0]), int(bound[1])))
        handler = functools.partial(
            handle_connection, node, target, port, resolver=resolver or NodeResolver(node)
        )
        await listener.serve(handler)


def run(args: argparse.Namespace) -> int:
    code: int = anyio.run(_main, args, backend=args.backend)
    return code


async def _main(args: argparse.Namespace) -> int:
    target, port = args.to
    if not isinstance(target, Address) and rendezvous_of(args) is None:
        raise UsageError(
            f"--to {target}: names and tags are looked up at a rendezvous: "
            "give --rendezvous HOST:PORT, or --to ADDRESS"
        )
    async with running_node(args) as node:
        if isinstance(target, Address):
            require_known_peer(node, target, args)

        async def body() -> None:
            async with anyio.create_task_group() as group:
                host, bound = await group.start(
                    functools.partial(serve_gateway, node, target, port, listen=args.listen)
                )
                shown = f"[{host}]" if ":" in host else host
                fields = node_fields(node, port)
                del fields["url"], fields["port"]
                ends = {"listen": f"{shown}:{bound}", "to": f"{target}:{port}"}
                announce("gateway", {**ends, **fields})

        return await until_signal(body)
