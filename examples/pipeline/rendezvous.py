"""The pipeline's rendezvous as a process: the registry where services are found by tag.

Every node of the pipeline registers here (tags, hostname, the UDP endpoint it is seen
from) and asks it who carries a tag; it also introduces peers behind NAT to each other
and relays when no direct path works. It prints one JSON line on stdout once listening,
with ``spec`` (``IDENTITY@host:port``): passing that as ``--rendezvous`` pins its key.

On a public host, bind its public address (not 0.0.0.0, whose replies may leave from
another address than the one asked) and keep its key and registry across restarts::

    python -m examples.pipeline.rendezvous --bind 203.0.113.7:9000 \\
        --identity rendezvous.key --db registry.db
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import anyio

from overlay_httpx import Identity, Rendezvous

from .common import announce, wait_for_stop


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--bind", default="127.0.0.1:9000", help="UDP HOST:PORT to listen on")
    p.add_argument("--identity", help="key file, created if missing (default: a new key)")
    p.add_argument("--db", default=":memory:", help="SQLite registry file")
    p.add_argument("--ttl", type=float, default=90.0, help="seconds a registration lives")
    p.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    p.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="also stop when stdin closes (the one-command runner uses this)",
    )
    return p


async def run(args: argparse.Namespace) -> None:
    identity = Identity.load_or_create(args.identity) if args.identity else Identity.generate()
    async with Rendezvous(identity, bind=args.bind, db=args.db, ttl=args.ttl) as rv:
        host, port = rv.endpoint
        announce(
            name="rendezvous", spec=rv.spec, address=str(rv.address), endpoint=f"{host}:{port}"
        )
        await wait_for_stop(watch_stdin=args.exit_with_parent)


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="rendezvous: %(levelname)s %(message)s")
    try:
        anyio.run(run, args, backend=args.backend)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
