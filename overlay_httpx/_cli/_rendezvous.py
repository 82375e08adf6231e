"""``overlay-httpx rendezvous``: run a rendezvous server (registry, discovery, punching, relay).

The server is an overlay node itself; its identity file is its permanent name
(nodes pin its key), and its SQLite file keeps the registry across restarts,
so nodes come back by themselves after one.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

import anyio

from .._exceptions import IdentityError, OverlayError
from .._identity import Identity
from .._rendezvous import Rendezvous, RendezvousSpec
from ._common import command_parser, positive_float, udp_endpoint
from ._errors import PROG, CliError
from ._runtime import announce, until_signal

__all__ = ["add_parser"]

DESCRIPTION = """\
Run a rendezvous: nodes started with --rendezvous HOST:PORT register with it
(authenticated by their tunnel's handshake), find each other by address,
hostname or tag, get help punching through NAT, and have their packets
relayed (still end-to-end encrypted) when no direct path works. Once serving,
one line is printed on stdout with the 'spec' to give nodes
(IDENTITY@HOST:PORT pins this server's key). On a host with several
addresses, listen on the public one rather than 0.0.0.0."""

EXAMPLES = """\
examples:
  overlay-httpx rendezvous --listen 0.0.0.0:9000 --db registry.db
  overlay-httpx rendezvous --listen 203.0.113.7:9000 --db /var/lib/overlay/registry.db \\
      --identity /var/lib/overlay/rendezvous.key --ttl 60
"""


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
) -> None:
    parser = command_parser(
        subparsers,
        parents,
        "rendezvous",
        "run a rendezvous server (registry, discovery, NAT traversal, relay)",
        DESCRIPTION,
        EXAMPLES,
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        type=udp_endpoint,
        default=("0.0.0.0", 9000),
        help="UDP address to serve on (default: 0.0.0.0:9000)",
    )
    parser.add_argument(
        "--db",
        metavar="PATH",
        default="rendezvous.db",
        help="SQLite registry file, created if missing (default: rendezvous.db; "
        "':memory:' keeps nothing)",
    )
    parser.add_argument(
        "--identity",
        metavar="PATH",
        help="identity file of the server, created (mode 0600) if missing "
        "(default: rendezvous.key beside --db)",
    )
    parser.add_argument(
        "--ttl",
        metavar="SECONDS",
        type=positive_float,
        default=90.0,
        help="registrations expire this long after the last heartbeat (default: 90)",
    )
    parser.add_argument(
        "--relay-rate",
        metavar="BYTES_PER_S",
        type=positive_float,
        default=8_000_000.0,
        help="relay budget per node; beyond it relayed packets are dropped and the "
        "tunnel slows down (default: 8000000)",
    )
    parser.set_defaults(run=run)


def _identity(args: argparse.Namespace) -> Identity:
    if args.identity is not None:
        path = Path(args.identity)
    elif args.db == ":memory:":
        return Identity.generate()
    else:
        path = Path(args.db).expanduser().resolve().parent / "rendezvous.key"
    try:
        return Identity.load_or_create(path)
    except (IdentityError, OSError) as exc:
        raise CliError(f"cannot use identity file {str(path)!r}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    identity = _identity(args)
    if args.db != ":memory:" and not Path(args.db).expanduser().resolve().parent.is_dir():
        raise CliError(f"--db {args.db!r}: its directory does not exist", exit_code=2)
    code: int = anyio.run(_main, identity, args, backend=args.backend)
    return code


async def _main(identity: Identity, args: argparse.Namespace) -> int:
    server = Rendezvous(
        identity, bind=args.listen, db=args.db, ttl=args.ttl, relay_rate=args.relay_rate
    )
    try:
        await server.__aenter__()
    except OSError as exc:
        host, port = args.listen
        hint = " (is another server on that port?)" if exc.errno == errno.EADDRINUSE else ""
        raise CliError(f"cannot listen on UDP {host}:{port}: {exc.strerror or exc}{hint}") from None
    except OverlayError as exc:
        raise CliError(f"cannot start the rendezvous: {exc}") from None
    try:
        host, port = server.endpoint
        announce(
            "rendezvous",
            {
                "address": server.address,
                "udp": f"{host}:{port}",
                "db": args.db,
                "spec": RendezvousSpec(host, port, server.public),
            },
        )
        if host in ("0.0.0.0", "::"):
            print(
                f"{PROG} rendezvous: note: replace {host} in the spec with an address of this "
                "host that the nodes can reach (better: --listen that address)",
                file=sys.stderr,
                flush=True,
            )
        return await until_signal(anyio.sleep_forever)
    finally:
        await server.aclose()
