"""overlay_httpx: persistent encrypted UDP tunnels between Python services.

Every process gets a permanent 48-bit overlay `Address`; a node's `Identity`
is the key pair its tunnels prove. See the README for the whole picture.
"""

from ._address import Address
from ._asgi import ClientDisconnected, LifespanFailed, OverlayServer, serve
from ._exceptions import (
    AddressError,
    HandshakeTimeout,
    IdentityCorrupt,
    IdentityError,
    IdentityExists,
    IdentityInsecure,
    IdentityNotFound,
    LocalProtocolError,
    NoiseDecryptError,
    NoiseStateError,
    OverlayError,
    PeerRestarted,
    PortInUse,
    PortUnreachable,
    RemoteProtocolError,
    StreamReset,
    TunnelClosed,
    TunnelError,
    UnknownPeer,
)
from ._http import AddressResolver, OverlayTransport, Resolver
from ._identity import Identity, PublicIdentity
from ._node import (
    Node,
    NodeStatistics,
    OverlayAttribute,
    OverlayListener,
    OverlayStream,
    PeerInfo,
)
from ._version import __version__

__all__ = [
    "Address",
    "AddressError",
    "AddressResolver",
    "ClientDisconnected",
    "HandshakeTimeout",
    "Identity",
    "IdentityCorrupt",
    "IdentityError",
    "IdentityExists",
    "IdentityInsecure",
    "IdentityNotFound",
    "LifespanFailed",
    "LocalProtocolError",
    "Node",
    "NodeStatistics",
    "NoiseDecryptError",
    "NoiseStateError",
    "OverlayAttribute",
    "OverlayError",
    "OverlayListener",
    "OverlayServer",
    "OverlayStream",
    "OverlayTransport",
    "PeerInfo",
    "PeerRestarted",
    "PortInUse",
    "PortUnreachable",
    "PublicIdentity",
    "RemoteProtocolError",
    "Resolver",
    "StreamReset",
    "TunnelClosed",
    "TunnelError",
    "UnknownPeer",
    "__version__",
    "serve",
]
