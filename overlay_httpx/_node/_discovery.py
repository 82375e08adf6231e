"""What a node knows about its peers, and whom it lets in.

`PeerBook` answers two questions for a `Node`: how to reach an address
(static peers, the rendezvous, live tunnels, then a rendezvous look-up that
also asks the peer to punch a hole towards us), and whether an incoming
handshake is admitted (the trust policy, with registered tags fetched from the
rendezvous when a rule needs them). Discovery sits above the node layer, so
the rendezvous client is imported lazily, only by nodes that have one.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, NamedTuple, TypeVar

from .._address import Address
from .._exceptions import (
    LocalProtocolError,
    NotRegistered,
    OverlayError,
    RegistryProtocolError,
    RendezvousUnavailable,
    UnknownPeer,
)
from .._identity import PublicIdentity, default_address
from .._protocol._endpoint import TrustCallback
from ._trust import TrustPolicy
from ._udp import Addr

if TYPE_CHECKING:
    from .._rendezvous._client import RendezvousClient
    from .._rendezvous._store import NodeRecord
    from ._node import Node

__all__ = ["PeerBook", "PeerInfo", "check_tags", "make_client", "network_key"]

logger = logging.getLogger("overlay_httpx")

_TAGS_FRESH: Final = 60.0  # seconds a peer's registered record is trusted for admission
_MAX_REMEMBERED: Final = 4096  # records kept from discovery and look-ups
_V = TypeVar("_V")


class PeerInfo(NamedTuple):
    """How to reach a peer: its proven keys and its UDP endpoint."""

    address: Address
    identity: PublicIdentity
    endpoint: Addr


class PeerBook:
    """Static peers, the rendezvous, what discovery taught us, and the trust policy."""

    def __init__(self, node: Node, trust: TrustPolicy | TrustCallback | None) -> None:
        if trust is not None and not isinstance(trust, TrustPolicy) and not callable(trust):
            raise LocalProtocolError(
                f"trust: expected a TrustPolicy or a callable(identity, address), got {trust!r}"
            )
        self._node = node
        self.trust = trust
        self.client: RendezvousClient | None = None
        self.static: dict[Address, PeerInfo] = {}
        self.rendezvous: PeerInfo | None = None
        self.discovered: dict[Address, NodeRecord] = {}
        self._tags: dict[Address, tuple[PublicIdentity, frozenset[str], float]] = {}
        self._tag_lookups: set[Address] = set()

    def known(self, address: Address) -> PeerInfo | None:
        """Static peers first, then the rendezvous, then peers with a live tunnel to us."""
        peer = self.static.get(address)
        if peer is not None:
            return peer
        if self.rendezvous is not None and self.rendezvous.address == address:
            return self.rendezvous
        if self._node._endpoint is not None:
            for tunnel in self._node._endpoint.tunnels():
                if (
                    tunnel.peer_address == address
                    and tunnel.peer_identity is not None
                    and not tunnel.is_closed
                ):
                    return PeerInfo(address, tunnel.peer_identity, tunnel.remote_addr)
        return None

    async def locate(self, address: Address, port: int) -> tuple[PeerInfo, NodeRecord | None]:
        """How to reach `address`: known already, or asked of the rendezvous.

        Asking the rendezvous (op ``connect``) also makes it tell the peer to
        punch a hole towards us, so the direct path has its best chance.
        """
        peer = self.known(address)
        if peer is not None:
            return peer, None
        if self.client is None:
            raise UnknownPeer(
                f"unknown peer {address}: no identity or UDP endpoint known (add it with "
                f"node.add_peer(address, identity, 'host:port') or give the node a rendezvous)",
                address=address,
                port=port,
            )
        try:
            record = await self.client.record("connect", address=str(address))
        except NotRegistered:
            raise UnknownPeer(
                f"unknown peer {address}: the rendezvous has no live record of it",
                address=address,
                port=port,
            ) from None
        except RendezvousUnavailable:
            cached = self.discovered.get(address)  # what we learned before may still work
            if cached is None:
                raise
            record = cached
        self.learn(record)
        return PeerInfo(address, record.identity, record.endpoint), record

    def admit(self, identity: PublicIdentity, address: Address) -> bool | None:
        """Trust policy, checked on every initiation before any state is kept.

        The address in a handshake is only a claim. It is believed when it is
        the one derived from the key, when `add_peer` (or the rendezvous's
        own entry) binds it to this key, or when the rendezvous's record
        does; a claim those contradict is refused. Address and network rules
        count only for a believed address.
        """
        if self.rendezvous is not None and identity == self.rendezvous.identity:
            return True
        status = self._address_status(identity, address)
        if status == "false":
            logger.debug("refused handshake: %s claimed by a key that is not its own", address)
            return False
        if status == "pending":
            return None
        trust = self.trust
        if trust is None:
            return True
        if not isinstance(trust, TrustPolicy):
            return _verdict(trust(identity, address), address)
        if trust.admits_key(identity):
            return True
        if status == "proven" and trust.admits_address(address):
            return True
        if not trust.needs_tags:
            return False
        tags = self._peer_tags(identity, address)
        return None if tags is None else trust.admits_tags(tags)

    def _address_status(self, identity: PublicIdentity, address: Address) -> str:
        """ "proven", "false" (another key owns it), "pending" (being asked) or "unverified"."""
        if default_address(identity, address.network) == address:
            return "proven"
        known = self.static.get(address)
        if known is None and self.rendezvous is not None and self.rendezvous.address == address:
            known = self.rendezvous
        if known is not None:
            return "proven" if known.identity == identity else "false"
        if self.client is None:
            return "unverified"  # nobody to ask: address and network rules will not count
        cached = self._tags.get(address)
        if cached is not None and cached[2] > self._node._clock():
            return "proven" if cached[0] == identity else "false"
        self._ask_about(address)
        return "pending"

    def _ask_about(self, address: Address) -> None:
        if address not in self._tag_lookups:
            self._tag_lookups.add(address)
            self._node._spawn(self._lookup_tags(address))

    def _peer_tags(self, identity: PublicIdentity, address: Address) -> frozenset[str] | None:
        """The peer's registered tags; None while they are being asked for."""
        cached = self._tags.get(address)
        if cached is not None and cached[2] > self._node._clock():
            return cached[1] if cached[0] == identity else frozenset()
        if self.client is None:
            return frozenset()
        self._ask_about(address)
        return None

    async def _lookup_tags(self, address: Address) -> None:
        assert self.client is not None
        try:
            self.learn(await self.client.record("lookup", address=str(address)))
        except NotRegistered:  # no live record: the address is nobody's, the claim unproven
            self._remember_owner(address, self._node.public, frozenset())
        except OverlayError as exc:
            logger.debug("could not look up the tags of %s: %s", address, exc)
        finally:
            self._tag_lookups.discard(address)

    def learn(self, record: NodeRecord) -> None:
        """Remember what the rendezvous told us about a peer (a bounded memory)."""
        _bounded_put(self.discovered, record.address, record)
        self._remember_owner(record.address, record.identity, frozenset(record.tags))

    def _remember_owner(
        self, address: Address, identity: PublicIdentity, tags: frozenset[str]
    ) -> None:
        """Who owns `address` and its tags, for admission, fresh for a while."""
        _bounded_put(self._tags, address, (identity, tags, self._node._clock() + _TAGS_FRESH))


def _bounded_put(table: dict[Address, _V], key: Address, value: _V) -> None:
    """Insert as the newest entry, dropping the oldest beyond `_MAX_REMEMBERED`."""
    table.pop(key, None)
    if len(table) >= _MAX_REMEMBERED:
        del table[next(iter(table))]
    table[key] = value


def network_key(value: bytes | str | None) -> bytes | None:
    """32 bytes, or their hex (64 digits) or base64 text."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            raw = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
        except (ValueError, binascii.Error):
            raw = b""
    elif isinstance(value, bytes):
        raw = value
    else:
        raw = b""
    if len(raw) != 32:
        raise LocalProtocolError(
            "network_key: expected 32 bytes (or their hex or base64 text), "
            "e.g. os.urandom(32) shared by every member of the network"
        )
    return raw


def check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    from .._rendezvous._store import validate_tags

    if isinstance(tags, str):
        raise LocalProtocolError(f"tags: expected a list of tags, got the string {tags!r}")
    try:
        return validate_tags(list(tags))
    except RegistryProtocolError as exc:
        raise LocalProtocolError(str(exc)) from None


def make_client(
    node: Node,
    rendezvous: str,
    tags: Iterable[str],
    hostname: str | None,
    direct_timeout: float,
) -> RendezvousClient:
    """The rendezvous client (imported here: discovery sits above the node layer)."""
    from .._rendezvous._client import RendezvousClient
    from .._rendezvous._spec import parse_rendezvous
    from .._rendezvous._store import validate_hostname

    spec = parse_rendezvous(rendezvous)
    try:
        name = validate_hostname(hostname)
    except RegistryProtocolError as exc:
        raise LocalProtocolError(str(exc)) from None
    return RendezvousClient(
        node, spec, tags=check_tags(tags), hostname=name, direct_timeout=direct_timeout
    )


def _verdict(value: object, address: Address) -> bool | None:
    """A trust callback's answer as the tunnel core takes it: True, False or None (not
    yet). Any other truthy or falsy value counts as such; an awaitable cannot be
    waited for inside a handshake, so it refuses, with an error in the log."""
    if value is None or isinstance(value, bool):
        return value
    if inspect.isawaitable(value):
        close = getattr(value, "close", None)
        if callable(close):
            close()  # a coroutine never awaited would warn at garbage collection
        logger.error(
            "refused handshake from %s: the trust callback returned an awaitable; it must "
            "answer at once with True, False or None",
            address,
        )
        return False
    return bool(value)
