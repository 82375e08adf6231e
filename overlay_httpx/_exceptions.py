"""The one exception tree of overlay_httpx.

Every error the library raises on purpose derives from `OverlayError`; where a
builtin error has the same meaning the class derives from it too, so code that
catches ``ValueError`` or ``FileNotFoundError`` keeps working::

    OverlayError
    ├── AddressError            (ValueError)   bad overlay address or host
    ├── IdentityError                          key files and key text
    │   ├── IdentityNotFound    (FileNotFoundError)
    │   ├── IdentityExists      (FileExistsError)
    │   ├── IdentityInsecure    (PermissionError)  readable by group or others
    │   └── IdentityCorrupt     (ValueError)
    ├── LocalProtocolError                     you misused an API (h11's split)
    │   └── NoiseStateError                    e.g. writing out of turn
    └── RemoteProtocolError                    the peer sent something invalid
        ├── NoiseDecryptError                  AEAD authentication failed
        ├── FrameError                         a frame or packet could not be decoded
        └── FlowControlError                   the peer sent beyond a limit we gave it

The mapping to httpx exceptions lives in one place, beside the transport.
"""

from __future__ import annotations

__all__ = [
    "AddressError",
    "FlowControlError",
    "FrameError",
    "IdentityCorrupt",
    "IdentityError",
    "IdentityExists",
    "IdentityInsecure",
    "IdentityNotFound",
    "LocalProtocolError",
    "NoiseDecryptError",
    "NoiseStateError",
    "OverlayError",
    "RemoteProtocolError",
]


class OverlayError(Exception):
    """Base of every error raised on purpose by overlay_httpx."""


class AddressError(OverlayError, ValueError):
    """An overlay address, host or integer form was not valid."""


class IdentityError(OverlayError):
    """An identity (key pair) could not be loaded, saved or parsed."""


class IdentityNotFound(IdentityError, FileNotFoundError):
    """The identity file does not exist."""


class IdentityExists(IdentityError, FileExistsError):
    """Saving would overwrite an existing identity file."""


class IdentityInsecure(IdentityError, PermissionError):
    """The identity file is readable by group or others."""


class IdentityCorrupt(IdentityError, ValueError):
    """The identity file or public-identity text is not in the expected format."""


class LocalProtocolError(OverlayError):
    """The caller used an API in a way its state does not allow."""


class RemoteProtocolError(OverlayError):
    """The peer sent something the protocol does not allow."""


class NoiseStateError(LocalProtocolError):
    """A Noise handshake or cipher state was used out of turn."""


class NoiseDecryptError(RemoteProtocolError):
    """A Noise message failed authentication or was malformed."""


class FrameError(RemoteProtocolError):
    """A packet or frame from the peer was malformed (truncated, bad type, overflow)."""


class FlowControlError(RemoteProtocolError):
    """The peer sent data past a flow-control limit or changed a stream's final size."""
