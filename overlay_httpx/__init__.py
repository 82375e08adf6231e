"""overlay_httpx: persistent encrypted UDP tunnels between Python services.

Every process gets a permanent 48-bit overlay `Address`; a node's `Identity`
is the key pair its tunnels prove. See the README for the whole picture.
"""

from ._address import Address
from ._exceptions import (
    AddressError,
    IdentityCorrupt,
    IdentityError,
    IdentityExists,
    IdentityInsecure,
    IdentityNotFound,
    LocalProtocolError,
    NoiseDecryptError,
    NoiseStateError,
    OverlayError,
    RemoteProtocolError,
)
from ._identity import Identity, PublicIdentity
from ._version import __version__

__all__ = [
    "Address",
    "AddressError",
    "Identity",
    "IdentityCorrupt",
    "IdentityError",
    "IdentityExists",
    "IdentityInsecure",
    "IdentityNotFound",
    "LocalProtocolError",
    "NoiseDecryptError",
    "NoiseStateError",
    "OverlayError",
    "PublicIdentity",
    "RemoteProtocolError",
    "__version__",
]
