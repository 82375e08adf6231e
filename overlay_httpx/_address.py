"""Overlay addresses: a 16-bit network and a 32-bit node, 48 bits in all.

Text form ``N:NNNN.HHHH.LLLL`` (network in decimal, then the 48 bits as three
groups of four hex digits, the first group repeating the network) is what
people read and type. URL form ``N-NNNN-HHHH-LLLL.overlay`` is what travels in
an httpx URL, because httpx would read ``1:0001.0001.0001`` as host ``1`` and
port ``0001.0001.0001``. The wire form is six big-endian bytes.
"""

from __future__ import annotations

import functools
import re
from typing import ClassVar, Final

from ._exceptions import AddressError

__all__ = ["HOST_SUFFIX", "Address"]

HOST_SUFFIX: Final = ".overlay"
_MAX_NETWORK: Final = 0xFFFF
_MAX_NODE: Final = 0xFFFF_FFFF
_TEXT_FORM: Final = "N:NNNN.HHHH.LLLL, e.g. '1:0001.0001.0001'"
_HOST_FORM: Final = "N-NNNN-HHHH-LLLL.overlay, e.g. '1-0001-0001-0001.overlay'"

_TEXT_RE: Final = re.compile(r"([0-9]{1,5}):([0-9a-fA-F]{4})\.([0-9a-fA-F]{4})\.([0-9a-fA-F]{4})")
_HOST_RE: Final = re.compile(r"([0-9]{1,5})-([0-9a-fA-F]{4})-([0-9a-fA-F]{4})-([0-9a-fA-F]{4})")


@functools.total_ordering
class Address:
    """A permanent overlay address: immutable, hashable, ordered by (network, node).

    >>> a = Address.parse("1:0001.0001.0001")
    >>> a.network, hex(a.node), a.host
    (1, '0x10001', '1-0001-0001-0001.overlay')
    """

    __slots__ = ("_network", "_node")

    WIRE_SIZE: ClassVar[int] = 6

    _network: int
    _node: int

    def __init__(self, network: int, node: int) -> None:
        if isinstance(network, bool) or not isinstance(network, int):
            raise AddressError(f"network must be an int, got {network!r}")
        if isinstance(node, bool) or not isinstance(node, int):
            raise AddressError(f"node must be an int, got {node!r}")
        if not 0 <= network <= _MAX_NETWORK:
            raise AddressError(f"network {network} out of range: expected 0..{_MAX_NETWORK}")
        if not 0 <= node <= _MAX_NODE:
            raise AddressError(f"node {node:#x} out of range: expected 0..{_MAX_NODE:#x}")
        object.__setattr__(self, "_network", network)
        object.__setattr__(self, "_node", node)

    # -- constructors -------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse the text form ``N:NNNN.HHHH.LLLL`` (hex case-insensitive)."""
        if not isinstance(text, str):
            raise AddressError(f"expected an address string like {_TEXT_FORM}, got {text!r}")
        m = _TEXT_RE.fullmatch(text.strip())
        if m is None:
            raise AddressError(f"invalid overlay address {text!r}: expected {_TEXT_FORM}")
        return cls._from_groups(text, *m.groups())

    @classmethod
    def from_host(cls, host: str) -> Address:
        """Parse the URL host form ``N-NNNN-HHHH-LLLL.overlay`` (inverse of `host`)."""
        if not isinstance(host, str):
            raise AddressError(f"expected an overlay host like {_HOST_FORM}, got {host!r}")
        name = host.strip().rstrip(".")
        if not name.lower().endswith(HOST_SUFFIX):
            raise AddressError(f"invalid overlay host {host!r}: expected {_HOST_FORM}")
        m = _HOST_RE.fullmatch(name[: -len(HOST_SUFFIX)])
        if m is None:
            raise AddressError(f"invalid overlay host {host!r}: expected {_HOST_FORM}")
        return cls._from_groups(host, *m.groups())

    @classmethod
    def from_int(cls, value: int) -> Address:
        """Build from the 48-bit integer ``network << 32 | node``."""
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 48:
            raise AddressError(f"48-bit address out of range: {value!r}")
        return cls(value >> 32, value & _MAX_NODE)

    @classmethod
    def from_bytes(cls, data: bytes) -> Address:
        """Decode the six-byte big-endian wire form."""
        if len(data) != cls.WIRE_SIZE:
            raise AddressError(f"an address is {cls.WIRE_SIZE} bytes on the wire, got {len(data)}")
        return cls.from_int(int.from_bytes(data, "big"))

    @classmethod
    def unspecified(cls) -> Address:
        """``0:0000.0000.0000``: no address yet (like 0.0.0.0)."""
        return cls(0, 0)

    @classmethod
    def broadcast(cls, network: int) -> Address:
        """Every node on `network`: node ``0xFFFFFFFF``."""
        return cls(network, _MAX_NODE)

    @classmethod
    def _from_groups(cls, original: str, net: str, hi: str, mid: str, lo: str) -> Address:
        network = int(net)
        if network > _MAX_NETWORK:
            raise AddressError(
                f"invalid overlay address {original!r}: network {network} exceeds {_MAX_NETWORK}"
            )
        if int(hi, 16) != network:
            raise AddressError(
                f"invalid overlay address {original!r}: the first hex group {hi!r} must repeat "
                f"network {network} (expected {network:04x})"
            )
        return cls(network, int(mid + lo, 16))

    # -- views ----------------------------------------------------------------

    @property
    def network(self) -> int:
        return self._network

    @property
    def node(self) -> int:
        return self._node

    @property
    def host(self) -> str:
        """The form httpx can carry in a URL: ``1-0001-0001-0001.overlay``."""
        n = self._node
        return f"{self._network}-{self._network:04x}-{n >> 16:04x}-{n & 0xFFFF:04x}{HOST_SUFFIX}"

    @property
    def is_unspecified(self) -> bool:
        return self._network == 0 and self._node == 0

    @property
    def is_broadcast(self) -> bool:
        return self._node == _MAX_NODE

    def __int__(self) -> int:
        return self._network << 32 | self._node

    def __index__(self) -> int:
        return int(self)

    def to_bytes(self) -> bytes:
        return int(self).to_bytes(self.WIRE_SIZE, "big")

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    def __str__(self) -> str:
        n = self._node
        return f"{self._network}:{self._network:04x}.{n >> 16:04x}.{n & 0xFFFF:04x}"

    def __repr__(self) -> str:
        return f"Address('{self}')"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Address):
            return NotImplemented
        return int(self) == int(other)

    def __lt__(self, other: Address) -> bool:
        if not isinstance(other, Address):
            return NotImplemented
        return int(self) < int(other)

    def __hash__(self) -> int:
        return hash(("overlay_httpx.Address", int(self)))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Address is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Address is immutable")

    def __reduce__(self) -> tuple[type[Address], tuple[int, int]]:
        return (Address, (self._network, self._node))
