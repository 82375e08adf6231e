"""HTTP over the overlay: `OverlayTransport` for httpx (client side)."""

from ._resolver import NodeResolver
from ._transport import AddressResolver, OverlayTransport, Resolver, default_identity_path

__all__ = [
    "AddressResolver",
    "NodeResolver",
    "OverlayTransport",
    "Resolver",
    "default_identity_path",
]
