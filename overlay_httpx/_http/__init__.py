"""HTTP over the overlay: `OverlayTransport` for httpx (client side)."""

from ._transport import AddressResolver, OverlayTransport, Resolver, default_identity_path

__all__ = ["AddressResolver", "OverlayTransport", "Resolver", "default_identity_path"]
