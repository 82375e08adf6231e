"""`TrustPolicy`: which authenticated peers may open a tunnel to this node.

The policy is checked on every incoming handshake after the peer has proven
its keys and before the node keeps any state for it (DESIGN: trust is
enforced on the data plane). A refused peer gets an authenticated refusal,
so its `connect` fails at once with `TrustRefused` instead of timing out.
Tag rules need the peer's registered tags: the node asks its rendezvous and
lets the peer's handshake retry find the answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from .._address import Address
from .._exceptions import LocalProtocolError
from .._identity import PublicIdentity

__all__ = ["TrustPolicy"]

_NO_TAGS: Final[frozenset[str]] = frozenset()


def _addresses(values: Iterable[Address | str]) -> frozenset[Address]:
    out = set()
    for value in values:
        if isinstance(value, Address):
            out.add(value)
        elif isinstance(value, str):
            out.add(
                Address.from_host(value) if value.endswith(".overlay") else Address.parse(value)
            )
        else:
            raise LocalProtocolError(f"trust addresses: {value!r} is not an overlay address")
    return frozenset(out)


def _keys(values: Iterable[PublicIdentity | str]) -> frozenset[PublicIdentity]:
    out = set()
    for value in values:
        if isinstance(value, str):
            value = PublicIdentity.parse(value)
        if not isinstance(value, PublicIdentity):
            raise LocalProtocolError(f"trust keys: {value!r} is not a public identity")
        out.add(value)
    return frozenset(out)


def _networks(values: Iterable[int]) -> frozenset[int]:
    out = set()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            raise LocalProtocolError(f"trust networks: {value!r} is not a network number 0..65535")
        out.add(value)
    return frozenset(out)


class TrustPolicy:
    """Admit a peer when any rule matches: its address, its key, its network or one of its tags.

    ::

        TrustPolicy(tags=["orchestrator"], keys=["ovid1_..."], networks=[1])

    A policy with no rules admits nobody; a node without a policy admits
    every peer that completes the handshake (add a network key to the node
    to limit that to members of the network).
    """

    __slots__ = ("addresses", "keys", "networks", "tags")

    def __init__(
        self,
        *,
        addresses: Iterable[Address | str] = (),
        keys: Iterable[PublicIdentity | str] = (),
        tags: Iterable[str] = (),
        networks: Iterable[int] = (),
    ) -> None:
        for name, value in (("addresses", addresses), ("keys", keys), ("tags", tags)):
            if isinstance(value, str):
                raise LocalProtocolError(f"trust {name}: expected a list, got the string {value!r}")
        self.addresses = _addresses(addresses)
        self.keys = _keys(keys)
        self.networks = _networks(networks)
        self.tags = frozenset(tags)

    @property
    def needs_tags(self) -> bool:
        return bool(self.tags)

    def admits_key(self, identity: PublicIdentity) -> bool:
        return identity in self.keys

    def admits_address(self, address: Address) -> bool:
        """For an address the node has verified (see `Node` on how addresses are believed)."""
        return address in self.addresses or address.network in self.networks

    def admits_tags(self, tags: frozenset[str]) -> bool:
        return not self.tags.isdisjoint(tags)

    def admits(
        self, identity: PublicIdentity, address: Address, tags: frozenset[str] = _NO_TAGS
    ) -> bool:
        """All rules at once, for an address already verified."""
        return self.admits_key(identity) or self.admits_address(address) or self.admits_tags(tags)

    def __repr__(self) -> str:
        parts = [
            f"{name}={sorted(map(str, getattr(self, name)))}"
            for name in self.__slots__
            if getattr(self, name)
        ]
        return f"TrustPolicy({', '.join(parts)})"
