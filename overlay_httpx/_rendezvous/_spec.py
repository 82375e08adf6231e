"""Where a rendezvous is and which key it must prove: ``"host:port"`` or ``"ovid1_...@host:port"``.

With the public identity written in front, the node pins it; with a bare
``host:port`` the node asks the rendezvous for its identity once (trust on
first use, like SSH) and the Noise handshake that follows proves it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from .._exceptions import LocalProtocolError
from .._identity import PublicIdentity

__all__ = ["REGISTRY_PORT", "RendezvousSpec", "parse_rendezvous"]

REGISTRY_PORT: Final = 7
"""The overlay port of the registry protocol on a rendezvous node."""


@dataclass(frozen=True, slots=True)
class RendezvousSpec:
    host: str
    """An IP literal or a DNS name (resolved when the node starts)."""
    port: int
    identity: PublicIdentity | None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        where = f"{host}:{self.port}"
        return f"{self.identity}@{where}" if self.identity is not None else where


def parse_rendezvous(value: str | RendezvousSpec) -> RendezvousSpec:
    """Check a rendezvous spec; one readable line on any mistake."""
    if isinstance(value, RendezvousSpec):
        return value
    if not isinstance(value, str):
        raise LocalProtocolError(
            f"rendezvous {value!r}: expected 'host:port' or 'IDENTITY@host:port'"
        )
    text = value.strip()
    identity: PublicIdentity | None = None
    if "@" in text:
        key_text, _, text = text.partition("@")
        try:
            identity = PublicIdentity.parse(key_text)
        except ValueError as exc:
            raise LocalProtocolError(f"rendezvous {value!r}: bad public identity ({exc})") from None
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) <= 0xFFFF:
        raise LocalProtocolError(
            f"rendezvous {value!r}: expected 'host:port' (port 1..65535), e.g. '203.0.113.7:9000'"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not all(part and part.replace("-", "").isalnum() for part in host.split(".")):
            raise LocalProtocolError(
                f"rendezvous {value!r}: {host!r} is neither an IP address nor a host name"
            ) from None
    return RendezvousSpec(host, int(port_text), identity)
