"""``overlay-httpx status``: what this node looks like from outside, and how it reaches peers.

A diagnostic: the node's address and identity, its UDP endpoint as bound and
as the rendezvous sees it (so NAT shows), its registration, and for each
``--probe`` target the tunnel it gets: direct or relayed, RTT, the UDP
endpoint in use, retransmissions.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping

import anyio

from .._exceptions import OverlayError
from .._http._resolver import NodeResolver
from .._node import Node
from ._common import add_node_options, command_parser, overlay_target, running_node

__all__ = ["add_parser"]

DESCRIPTION = """\
Start this node (with the usual node options), register it if a rendezvous is
given, optionally open a tunnel to each --probe target (an overlay address,
NAME.overlay or TAG.tag.overlay, with an optional :PORT), and print the node's
statistics: UDP endpoint as bound and as seen by the rendezvous (a difference
means NAT), and per tunnel the path (direct or relayed), RTT, the peer's UDP
endpoint, packets lost and retransmitted. Exit code 1 when a probe fails."""

EXAMPLES = """\
examples:
  overlay-httpx status --rendezvous 203.0.113.7:9000
  overlay-httpx status --rendezvous 203.0.113.7:9000 --probe llm.overlay --json
"""


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
) -> None:
    parser = command_parser(
        subparsers,
        parents,
        "status",
        "show this node's endpoints, registration and tunnels (optionally probe peers)",
        DESCRIPTION,
        EXAMPLES,
    )
    parser.add_argument(
        "--probe",
        dest="probes",
        metavar="TARGET[:PORT]",
        type=overlay_target,
        action="append",
        default=[],
        help="open a tunnel to TARGET and report it (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    add_node_options(parser)
    parser.set_defaults(run=run, throwaway_identity=True)


def run(args: argparse.Namespace) -> int:
    code: int = anyio.run(_main, args, backend=args.backend)
    return code


async def _probe(node: Node, target: object, port: int) -> str | None:
    """None when the tunnel came up, else why not."""
    try:
        with anyio.fail_after(10):
            if isinstance(target, str):
                addresses = await NodeResolver(node).resolve(target)
            else:
                addresses = [target]  # type: ignore[list-item]
            if not addresses:
                return "no live node serves it"
            for address in addresses:
                stream = await node.connect(address, port)
                await stream.aclose()
        return None
    except (OverlayError, TimeoutError, OSError) as exc:
        return str(exc) or type(exc).__name__


async def _main(args: argparse.Namespace) -> int:
    async with running_node(args) as node:
        failures = {
            f"{target}:{port}": why
            for target, port in args.probes
            if (why := await _probe(node, target, port)) is not None
        }
        stats = node.statistics()
    document = {
        "address": str(stats.address),
        "identity": str(node.public),
        "endpoint": list(stats.endpoint),
        "rendezvous": stats.rendezvous,
        "registered": stats.registered,
        "observed_endpoint": list(stats.observed_endpoint) if stats.observed_endpoint else None,
        "tunnels": [
            {
                "peer": str(t.peer_address),
                "path": t.path,
                "state": t.state,
                "remote": list(t.remote_addr),
                "rtt_ms": None if t.smoothed_rtt is None else round(t.smoothed_rtt * 1e3, 3),
                "packets_lost": t.packets_lost,
                "frames_retransmitted": t.frames_retransmitted,
            }
            for t in stats.tunnels
        ],
        "drops": stats.drops,
        "probe_failures": failures,
    }
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        _print(document)
    return 1 if failures else 0


def _print(doc: Mapping[str, object]) -> None:
    print(f"address     {doc['address']}")
    print(f"identity    {doc['identity']}")
    print(f"udp         {_ep(doc['endpoint'])}")
    if doc["rendezvous"]:
        seen = doc["observed_endpoint"]
        state = "registered" if doc["registered"] else "NOT registered"
        print(f"rendezvous  {doc['rendezvous']} ({state})")
        if seen:
            nat = "" if seen == doc["endpoint"] else "  (NAT: differs from the bound endpoint)"
            print(f"seen as     {_ep(seen)}{nat}")
    tunnels = doc["tunnels"]
    assert isinstance(tunnels, list)
    for t in tunnels:
        rtt = "-" if t["rtt_ms"] is None else f"{t['rtt_ms']} ms"
        print(
            f"tunnel      {t['peer']}  {t['path']}  {t['state']}  rtt {rtt}  via {_ep(t['remote'])}"
            f"  lost {t['packets_lost']}  retransmitted {t['frames_retransmitted']}"
        )
    failures = doc["probe_failures"]
    assert isinstance(failures, dict)
    for target, why in failures.items():
        print(f"probe       {target}: FAILED: {why}")


def _ep(value: object) -> str:
    if isinstance(value, list) and len(value) == 2:
        return f"{value[0]}:{value[1]}"
    return str(value)
