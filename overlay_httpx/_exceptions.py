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
    ├── RemoteProtocolError                    the peer sent something invalid
    │   ├── NoiseDecryptError                  AEAD authentication failed
    │   ├── FrameError                         a frame or packet could not be decoded
    │   └── FlowControlError                   the peer sent beyond a limit we gave it
    ├── LifespanFailed          (RuntimeError)  an app's lifespan startup failed: no serving
    ├── ClientDisconnected      (OSError)      an ASGI app's send() after the client went away
    ├── RegistryError                          the rendezvous refused or failed a request
    │   ├── AddressTaken                       the address belongs to another key
    │   ├── HostnameTaken                      another live node holds the hostname
    │   ├── NotRegistered       (LookupError)  no live record for an address, name or tag
    │   ├── RegistryProtocolError              a registry message could not be decoded
    │   └── StoreError                         the registry database cannot be used
    └── TunnelError                            a tunnel or stream could not do its job
        ├── UnknownPeer         (LookupError)  no identity or endpoint for an address
        ├── HandshakeTimeout    (TimeoutError) the peer never answered the handshake
        ├── TrustRefused        (PermissionError)  the peer's trust policy refused us
        ├── RendezvousUnavailable              no rendezvous configured or reachable
        ├── PortInUse           (OSError)      listen() on a port already listened on
        ├── TunnelClosed        (anyio.BrokenResourceError)  by the peer, idle timeout, us
        │   └── PeerRestarted                  the peer came back with a new session
        └── StreamReset         (anyio.BrokenResourceError)  the peer abandoned the stream
            └── PortUnreachable (ConnectionRefusedError)     nobody listens on that port

Every `TunnelError` names the overlay address (and the port, where there is
one) in its message and carries them as ``address`` and ``port``.

The mapping to httpx exceptions lives in one place, beside the transport.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from ._address import Address

__all__ = [
    "AddressError",
    "AddressTaken",
    "ClientDisconnected",
    "FlowControlError",
    "FrameError",
    "HandshakeTimeout",
    "HostnameTaken",
    "IdentityCorrupt",
    "IdentityError",
    "IdentityExists",
    "IdentityInsecure",
    "IdentityNotFound",
    "LifespanFailed",
    "LocalProtocolError",
    "NoiseDecryptError",
    "NoiseStateError",
    "NotRegistered",
    "OverlayError",
    "PeerRestarted",
    "PortInUse",
    "PortUnreachable",
    "RegistryError",
    "RegistryProtocolError",
    "RemoteProtocolError",
    "RendezvousUnavailable",
    "StoreError",
    "StreamReset",
    "TrustRefused",
    "TunnelClosed",
    "TunnelError",
    "UnknownPeer",
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


class TunnelError(OverlayError):
    """A tunnel or stream to `address` (port `port`, when there is one) failed."""

    def __init__(self, message: str, *, address: Address | None = None, port: int | None = None):
        super().__init__(message)
        self.address = address
        self.port = port


class UnknownPeer(TunnelError, LookupError):
    """No public identity and UDP endpoint are known for the address."""


class HandshakeTimeout(TunnelError, TimeoutError):
    """The peer did not answer the handshake within the handshake timeout."""


class TrustRefused(TunnelError, PermissionError):
    """The peer proved who it is and then refused us: its trust policy does not admit our key."""


class RendezvousUnavailable(TunnelError):
    """The operation needs a rendezvous, and none is configured or it cannot be reached."""


class PortInUse(TunnelError, OSError):
    """Something on this node already listens on the overlay port."""


class TunnelClosed(TunnelError, anyio.BrokenResourceError):
    """The tunnel ended under the stream: closed by the peer, by idle timeout or by us."""

    def __init__(
        self,
        message: str,
        *,
        address: Address | None = None,
        port: int | None = None,
        by_peer: bool = False,
    ) -> None:
        super().__init__(message, address=address, port=port)
        self.by_peer = by_peer


class PeerRestarted(TunnelClosed):
    """The peer restarted (same identity, new session); its old streams are gone.

    `delivered` counts the bytes we had sent on the stream that the peer's
    previous life acknowledged: anything written after that offset was
    never seen by anyone and is safe to send again.
    """

    def __init__(
        self,
        message: str,
        *,
        address: Address | None = None,
        port: int | None = None,
        delivered: int = 0,
    ) -> None:
        super().__init__(message, address=address, port=port)
        self.delivered = delivered


class StreamReset(TunnelError, anyio.BrokenResourceError):
    """The peer reset the stream (or asked us to stop sending) with `error_code`."""

    def __init__(
        self,
        message: str,
        *,
        address: Address | None = None,
        port: int | None = None,
        error_code: int = 0,
    ) -> None:
        super().__init__(message, address=address, port=port)
        self.error_code = error_code


class PortUnreachable(StreamReset, ConnectionRefusedError):
    """The peer answered that nothing listens on the overlay port."""


class LifespanFailed(OverlayError, RuntimeError):
    """The app's lifespan startup failed, so the server did not start serving."""


class ClientDisconnected(OverlayError, OSError):
    """`send()` after the client reset the stream or the connection went away.

    An `OSError`, as ASGI 2.4 asks of servers, so frameworks that catch it
    (Starlette's ``ClientDisconnect``) stop the response quietly.
    """


class RegistryError(OverlayError):
    """The rendezvous refused or could not carry out a registry request.

    `code` is the registry's machine-readable reason (e.g. ``"address_taken"``).
    """

    code = "registry_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class AddressTaken(RegistryError):
    """The address is bound to another public key (or this key already holds another address)."""

    code = "address_taken"


class HostnameTaken(RegistryError):
    """Another live node holds the hostname."""

    code = "hostname_taken"


class NotRegistered(RegistryError, LookupError):
    """No live record answers the address, hostname or tag."""

    code = "not_registered"


class RegistryProtocolError(RegistryError, RemoteProtocolError):
    """A registry message was malformed: bad framing, bad JSON, or a field of the wrong shape."""

    code = "bad_request"


class StoreError(RegistryError):
    """The registry database cannot be opened, read or written."""

    code = "store_error"
