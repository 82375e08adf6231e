"""The options every node-running command shares, and the one place a `Node` is built.

``serve``, ``request``, ``gateway`` and ``expose`` all run a node, so they take
the same ``--identity``, ``--bind``, ``--peer``, ``--rendezvous``, ``--tag``
and ``--hostname`` options with the same environment defaults. Argument
types here check text at parse time, so a typo is a one-line usage error
(exit 2) before anything touches the network.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from .._address import Address
from .._exceptions import (
    AddressError,
    IdentityError,
    IdentityNotFound,
    LocalProtocolError,
    OverlayError,
)
from .._http._transport import BIND_ENV, IDENTITY_ENV, RENDEZVOUS_ENV, default_identity_path
from .._identity import Identity, PublicIdentity
from .._node import Node
from .._node._udp import parse_endpoint
from ._errors import CliError, UsageError

__all__ = [
    "RENDEZVOUS_ENV",
    "PeerSpec",
    "add_node_options",
    "command_parser",
    "open_node",
    "overlay_address",
    "overlay_port",
    "overlay_target",
    "peer_spec",
    "positive_float",
    "rendezvous_of",
    "require_known_peer",
    "running_node",
    "tcp_endpoint",
    "udp_endpoint",
]

DEFAULT_BIND = "0.0.0.0:0"
_PEER_FORM = "ADDRESS=IDENTITY@HOST:PORT, e.g. 1:0001.0001.0001=ovid1_...@192.0.2.7:4000"


@dataclass(frozen=True)
class PeerSpec:
    """A static peer from ``--peer``: what `Node.add_peer` takes."""

    address: Address
    identity: PublicIdentity
    endpoint: tuple[str, int]


# -- argument types (argparse turns ArgumentTypeError into a usage error) ----------------


def overlay_address(text: str) -> Address:
    """``1:0001.0001.0001`` or its host form ``1-0001-0001-0001.overlay``."""
    try:
        if text.lower().endswith(".overlay"):
            return Address.from_host(text)
        return Address.parse(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def overlay_port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"invalid overlay port {text!r}: expected 0..65535")
    return int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected seconds > 0, e.g. 10")
    return value


def udp_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` with an IP literal host (what a UDP socket binds or sends to)."""
    try:
        return parse_endpoint(text, "endpoint")
    except LocalProtocolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def tcp_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` where HOST may be a name such as localhost."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 0xFFFF:
        raise argparse.ArgumentTypeError(
            f"invalid endpoint {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080"
        )
    return host, int(port)


_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.overlay$")


def overlay_target(text: str) -> tuple[Address | str, int]:
    """``TARGET[:PORT]`` (port 80 when left out).

    TARGET is an address in either form, or a name the rendezvous resolves
    (``llm.overlay``, ``gpu.tag.overlay``), returned as lowercase text.
    """
    text = text.strip()
    head, sep, tail = text.rpartition(":")
    has_port = bool(sep) and tail.isdigit() and (head.count(":") == 1 or "." in head)
    target_text = head if has_port else text
    target: Address | str
    try:
        target = overlay_address(target_text)
    except argparse.ArgumentTypeError:
        if not _NAME.match(target_text.lower()):
            raise argparse.ArgumentTypeError(
                f"invalid overlay target {text!r}: expected ADDRESS[:PORT], e.g. "
                "1:0001.0001.0001 or 1:0001.0001.0001:8000 (or NAME.overlay with --rendezvous)"
            ) from None
        target = target_text.lower()
    port = overlay_port(tail) if has_port else 80
    return target, port


def peer_spec(text: str) -> PeerSpec:
    """``ADDRESS=IDENTITY@HOST:PORT``: a peer known without a rendezvous."""
    address_text, eq, rest = text.strip().partition("=")
    identity_text, at, endpoint_text = rest.rpartition("@")
    if not eq or not at or not address_text or not identity_text:
        raise argparse.ArgumentTypeError(f"invalid peer {text!r}: expected {_PEER_FORM}")
    try:
        identity = PublicIdentity.parse(identity_text)
    except IdentityError as exc:
        raise argparse.ArgumentTypeError(f"peer {address_text}: {exc}") from None
    address = overlay_address(address_text)
    endpoint = udp_endpoint(endpoint_text)
    return PeerSpec(address, identity, endpoint)


# -- the options --------------------------------------------------------------------------


def command_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str,
    examples: str,
) -> argparse.ArgumentParser:
    """One subcommand's parser, laid out like all the others."""
    return subparsers.add_parser(
        name,
        help=summary,
        description=description,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=parents,
    )


def add_node_options(parser: argparse.ArgumentParser, *, register: bool = True) -> None:
    """The options that describe this process's node; `register=False` leaves out the
    ones that only matter to a node others should find (--tag, --hostname)."""
    group = parser.add_argument_group("node options")
    group.add_argument(
        "--identity",
        metavar="PATH",
        help=f"identity file (default: ${IDENTITY_ENV}, else "
        "$XDG_CONFIG_HOME/overlay_httpx/identity or ~/.config/overlay_httpx/identity, "
        "created with mode 0600 on first use; find, request and status use a throwaway "
        "key unless given one); an explicit PATH must exist "
        "(make one with 'overlay-httpx keygen --out PATH')",
    )
    group.add_argument(
        "--bind",
        metavar="HOST:PORT",
        type=udp_endpoint,
        help=f"local UDP socket (default: ${BIND_ENV}, else {DEFAULT_BIND})",
    )
    group.add_argument(
        "--peer",
        dest="peers",
        metavar="ADDRESS=IDENTITY@HOST:PORT",
        type=peer_spec,
        action="append",
        default=[],
        help="a peer reachable without a rendezvous (repeatable)",
    )
    group.add_argument(
        "--rendezvous",
        metavar="[IDENTITY@]HOST:PORT",
        help="rendezvous that finds peers by address, name or tag and helps through NAT "
        f"(default: ${RENDEZVOUS_ENV})",
    )
    if not register:
        parser.set_defaults(tags=[], hostname=None)
        return
    group.add_argument(
        "--tag",
        dest="tags",
        metavar="TAG",
        action="append",
        default=[],
        help="register this node under TAG at the rendezvous (repeatable)",
    )
    group.add_argument(
        "--hostname", metavar="NAME", help="register this node as NAME at the rendezvous"
    )


def _load_identity(args: argparse.Namespace) -> Identity:
    explicit: str | None = args.identity
    if explicit is None and getattr(args, "throwaway_identity", False):
        if not os.environ.get(IDENTITY_ENV):
            # A one-off client (find, request, status) must not share the key of a
            # long-running node of the same user: two live processes with one key
            # are one peer to everyone, and would unseat each other at the rendezvous.
            return Identity.generate()
        explicit = os.environ[IDENTITY_ENV]
    try:
        if explicit is not None:
            return Identity.load(explicit)
        return Identity.load_or_create(default_identity_path())
    except IdentityNotFound:
        raise CliError(
            f"identity file {explicit!r} does not exist: expected a file made by "
            f"'overlay-httpx keygen --out {explicit}'"
        ) from None
    except IdentityError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        shown = explicit or str(default_identity_path())
        raise CliError(f"cannot use identity file {shown!r}: {exc.strerror or exc}") from None


def _bind(args: argparse.Namespace) -> tuple[str, int]:
    if args.bind is not None:
        bind: tuple[str, int] = args.bind
        return bind
    text = os.environ.get(BIND_ENV) or DEFAULT_BIND
    try:
        return parse_endpoint(text, "bind")
    except LocalProtocolError as exc:
        raise UsageError(f"${BIND_ENV}: {exc}") from None


def rendezvous_of(args: argparse.Namespace) -> str | None:
    """``--rendezvous``, else ``$OVERLAY_HTTPX_RENDEZVOUS``, else None."""
    given: str | None = args.rendezvous or os.environ.get(RENDEZVOUS_ENV) or None
    return given


def open_node(args: argparse.Namespace) -> Node:
    """The (not yet started) node the command line describes, static peers added."""
    identity = _load_identity(args)
    bind = _bind(args)
    rendezvous = rendezvous_of(args)
    tags: tuple[str, ...] = tuple(args.tags)
    hostname: str | None = args.hostname
    if rendezvous is None and (tags or hostname is not None):
        raise UsageError(
            "--tag and --hostname register this node at a rendezvous: "
            f"give --rendezvous HOST:PORT too (or set ${RENDEZVOUS_ENV})"
        )
    try:
        node = Node(identity, bind=bind, rendezvous=rendezvous, tags=tags, hostname=hostname)
    except LocalProtocolError as exc:
        source = "" if args.rendezvous or rendezvous is None else f"${RENDEZVOUS_ENV}: "
        raise UsageError(f"{source}{exc}") from None
    for peer in args.peers:
        try:
            node.add_peer(peer.address, peer.identity, peer.endpoint)
        except LocalProtocolError as exc:
            raise UsageError(f"--peer {peer.address}: {exc}") from None
    return node


@asynccontextmanager
async def running_node(args: argparse.Namespace) -> AsyncIterator[Node]:
    """`open_node`, started; a UDP port that cannot be bound is a one-line error."""
    node = open_node(args)
    try:
        await node.__aenter__()
    except OverlayError:
        raise  # its own message says what went wrong (a rendezvous refusal, say)
    except OSError as exc:
        host, port = _bind(args)
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise CliError(
                f"cannot bind UDP {host}:{port}: {exc.strerror or exc} "
                "(choose another --bind HOST:PORT, port 0 for any free one)"
            ) from None
        raise CliError(
            f"cannot start the node on UDP {host}:{port}: {exc.strerror or exc}"
        ) from None
    try:
        yield node
    finally:
        await node.aclose()


def require_known_peer(node: Node, address: Address, args: argparse.Namespace) -> None:
    """Fail before any network traffic when nothing could tell us how to reach `address`."""
    if any(peer.address == address for peer in node.peers()):
        return
    if rendezvous_of(args) is not None:
        return  # the rendezvous will say where it is
    raise UsageError(
        f"unknown peer {address}: give its identity and UDP endpoint with --peer {address}="
        "IDENTITY@HOST:PORT"
    )
