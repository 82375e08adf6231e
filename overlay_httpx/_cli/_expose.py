"""``overlay-httpx expose``: publish a local HTTP/1.1 service on an overlay port.

The existing service (uvicorn, a model server, anything speaking HTTP/1.1 on
TCP) stays as it is; `ReverseProxy` served on the overlay forwards each
request to it, so overlay clients reach it without it importing anything.
"""

from __future__ import annotations

import argparse
import functools

import anyio

from .._asgi import serve
from ._common import add_node_options, command_parser, overlay_port, running_node, tcp_endpoint
from ._errors import UsageError
from ._proxy import ReverseProxy
from ._runtime import announce, node_fields, until_signal

__all__ = ["add_parser", "upstream_url"]

DESCRIPTION = """\
Publish an HTTP/1.1 service that listens on a local TCP port (uvicorn, a model
server, any web server) on an overlay port of this node: each request that
arrives over the overlay (HTTP/2) is forwarded to http://HOST:PORT on a
kept-alive connection, bodies streamed both ways, hop-by-hop headers dropped,
and the caller's proven overlay address and identity added as
x-overlay-peer-address and x-overlay-peer-identity. If the service is down the
caller gets 502. One line, 'overlay-httpx expose: ready upstream=... address=...
port=... url=... udp=... identity=...', is printed on stdout once it serves."""

EXAMPLES = """\
examples:
  uvicorn main:app --port 8000 &
  overlay-httpx expose 127.0.0.1:8000 --port 80 --identity llm.key --bind 0.0.0.0:4000
  overlay-httpx expose localhost:9000 --port 9000
"""


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
) -> None:
    parser = command_parser(
        subparsers,
        parents,
        "expose",
        "publish a local HTTP/1.1 service on an overlay port",
        DESCRIPTION,
        EXAMPLES,
    )
    parser.add_argument(
        "upstream", metavar="HOST:PORT", help="the local service, e.g. 127.0.0.1:8000"
    )
    parser.add_argument(
        "--port", type=overlay_port, default=80, help="overlay port to serve on (default: 80)"
    )
    add_node_options(parser)
    parser.set_defaults(run=run)


def upstream_url(text: str) -> str:
    """``HOST:PORT`` (or ``http://HOST:PORT``) as the proxy's base URL."""
    bare = text.strip().removeprefix("http://").rstrip("/")
    if "/" in bare or "://" in bare:
        raise UsageError(
            f"invalid upstream {text!r}: expected HOST:PORT of an HTTP/1.1 service, "
            "e.g. 127.0.0.1:8000"
        )
    try:
        host, port = tcp_endpoint(bare)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"upstream: {exc}") from None
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def run(args: argparse.Namespace) -> int:
    upstream = upstream_url(args.upstream)
    code: int = anyio.run(_main, args, upstream, backend=args.backend)
    return code


async def _main(args: argparse.Namespace, upstream: str) -> int:
    proxy = ReverseProxy(upstream)
    try:
        async with running_node(args) as node:

            async def body() -> None:
                async with anyio.create_task_group() as group:
                    await group.start(functools.partial(serve, proxy, node, port=args.port))
                    announce("expose", {"upstream": upstream, **node_fields(node, args.port)})

            return await until_signal(body)
    finally:
        await proxy.aclose()
