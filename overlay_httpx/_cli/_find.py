"""``overlay-httpx find``: the live nodes carrying a tag (or holding a name), from the rendezvous.

The scripted form of ``node.find_by_tag``, as ``pilotctl find-by-tag ... --json``
in the reference article: one JSON document for tools, a table for people.
"""

from __future__ import annotations

import argparse
import json

import anyio

from .._exceptions import NotRegistered, RegistryProtocolError
from .._rendezvous._store import NodeRecord, format_endpoint, validate_hostname, validate_tag
from ._common import add_node_options, command_parser, rendezvous_of, running_node
from ._errors import UsageError

__all__ = ["add_parser"]

DESCRIPTION = """\
Ask the rendezvous which live nodes carry --tag (or which node holds
--name) and print their address, public identity, endpoints, tags and
hostname. Needs --rendezvous (or $OVERLAY_HTTPX_RENDEZVOUS)."""

EXAMPLES = """\
examples:
  overlay-httpx find --tag model-service --rendezvous 203.0.113.7:9000
  overlay-httpx find --tag llm --json
  overlay-httpx find --name llm
"""


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
) -> None:
    parser = command_parser(
        subparsers,
        parents,
        "find",
        "list the live nodes with a tag (or a hostname) at the rendezvous",
        DESCRIPTION,
        EXAMPLES,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--tag", dest="find_tag", metavar="TAG", help="nodes carrying TAG")
    what.add_argument("--name", dest="find_name", metavar="NAME", help="the node named NAME")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    add_node_options(parser, register=False)
    parser.set_defaults(run=run, throwaway_identity=True)


def run(args: argparse.Namespace) -> int:
    if rendezvous_of(args) is None:
        raise UsageError("find asks a rendezvous: give --rendezvous HOST:PORT")
    try:
        if args.find_tag is not None:
            validate_tag(args.find_tag)
        else:
            validate_hostname(args.find_name)
    except RegistryProtocolError as exc:
        raise UsageError(str(exc)) from None
    code: int = anyio.run(_main, args, backend=args.backend)
    return code


async def _main(args: argparse.Namespace) -> int:
    async with running_node(args) as node:
        if args.find_tag is not None:
            records = await node.find_by_tag(args.find_tag)
        else:
            try:
                records = [await node.resolve(args.find_name)]
            except NotRegistered:
                records = []
    if args.json:
        print(json.dumps({"nodes": [_json(r) for r in records]}, indent=2))
    elif not records:
        print("no live node found")
    else:
        for record in records:
            name = f"  {record.hostname}" if record.hostname else ""
            print(f"{record.address}{name}  tags={','.join(record.tags) or '-'}")
            print(f"    endpoint {format_endpoint(record.endpoint)}  identity {record.identity}")
    return 0 if records else 1


def _json(record: NodeRecord) -> dict[str, object]:
    document = record.to_json()
    document["host"] = record.address.host
    return document
