"""``overlay-httpx serve``: an ASGI app on an overlay port, like ``uvicorn MODULE:APP``.

The app gets HTTP/2 from the bridge (`serve`), lifespan included; the command
adds the node from the common options, one ready line, and a graceful stop
on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import functools

import anyio

from .._asgi import LifespanFailed, serve
from .._asgi._types import ASGIApp
from ._common import add_node_options, command_parser, overlay_port, positive_float, running_node
from ._errors import CliError
from ._loader import load_app
from ._runtime import announce, node_fields, until_signal

__all__ = ["add_parser"]

DESCRIPTION = """\
Import an ASGI app (FastAPI, Starlette, any ASGI 3 callable) from MODULE:APP,
as uvicorn does, and serve it over HTTP/2 on an overlay port of this node,
lifespan included. Once requests can be served one line is printed on stdout,
'overlay-httpx serve: ready address=... port=... url=... udp=... identity=...',
which clients need (address, UDP endpoint and public identity for their
--peer). SIGINT or SIGTERM stops gracefully: no new requests, in-flight ones
finish (up to --shutdown-timeout seconds), lifespan shutdown runs."""

EXAMPLES = """\
examples:
  overlay-httpx serve main:app
  overlay-httpx serve 'api.server:create_app()' --port 8000 --app-dir src
  overlay-httpx serve main:app --identity llm.key --bind 0.0.0.0:4000
"""


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
) -> None:
    parser = command_parser(
        subparsers,
        parents,
        "serve",
        "serve an ASGI app (MODULE:APP) on an overlay port",
        DESCRIPTION,
        EXAMPLES,
    )
    parser.add_argument("app", metavar="MODULE:APP", help="e.g. main:app or pkg.api:make_app()")
    parser.add_argument(
        "--port", type=overlay_port, default=80, help="overlay port to serve on (default: 80)"
    )
    parser.add_argument(
        "--app-dir",
        metavar="DIR",
        default=".",
        help="directory put first on the Python path to import MODULE (default: .)",
    )
    parser.add_argument(
        "--factory", action="store_true", help="APP is a factory to call for the app"
    )
    parser.add_argument(
        "--lifespan",
        choices=["auto", "on", "off"],
        default="auto",
        help="run the app's lifespan events (default: auto)",
    )
    parser.add_argument("--root-path", default="", help="ASGI root_path (a mount prefix)")
    parser.add_argument(
        "--shutdown-timeout",
        metavar="SECONDS",
        type=positive_float,
        default=5.0,
        help="how long requests in flight may take to finish on stop (default: 5)",
    )
    add_node_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.root_path.endswith("/"):
        raise CliError(f"--root-path {args.root_path!r}: must not end with '/'", exit_code=2)
    app = load_app(args.app, app_dir=args.app_dir, factory=args.factory)
    code: int = anyio.run(_main, app, args, backend=args.backend)
    return code


async def _main(app: ASGIApp, args: argparse.Namespace) -> int:
    async with running_node(args) as node:

        async def body() -> None:
            async with anyio.create_task_group() as group:
                try:
                    await group.start(
                        functools.partial(
                            serve,
                            app,
                            node,
                            port=args.port,
                            root_path=args.root_path,
                            lifespan=args.lifespan,
                            shutdown_timeout=args.shutdown_timeout,
                        )
                    )
                except LifespanFailed as exc:
                    raise CliError(f"app {args.app!r} failed to start: {exc}") from exc
                announce("serve", {"app": args.app, **node_fields(node, args.port)})

        return await until_signal(body)
