"""The one place where overlay and h2 failures become httpx exceptions.

httpx users catch `httpx.TransportError` and its subclasses; everything the
transport raises is one of those, with the overlay (or h2) error chained as
``__cause__`` and a message that says what happened and to which peer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import anyio
import h2.exceptions
import httpx

from .._exceptions import (
    AddressError,
    HandshakeTimeout,
    OverlayError,
    PeerRestarted,
    PortUnreachable,
    StreamReset,
    TunnelClosed,
    UnknownPeer,
)

__all__ = [
    "ConnectionLost",
    "InvalidRequestHeader",
    "MalformedResponse",
    "Phase",
    "ServerResetStream",
    "map_errors",
]

Phase = Literal["connect", "write", "read", "pool"]

_TIMEOUTS: dict[Phase, type[httpx.TimeoutException]] = {
    "connect": httpx.ConnectTimeout,
    "write": httpx.WriteTimeout,
    "read": httpx.ReadTimeout,
    "pool": httpx.PoolTimeout,
}
_NETWORK: dict[Phase, type[httpx.NetworkError]] = {
    "connect": httpx.ConnectError,
    "write": httpx.WriteError,
    "read": httpx.ReadError,
    "pool": httpx.ConnectError,
}


class ConnectionLost(Exception):
    """The HTTP/2 connection ended under a request the server had begun: its GOAWAY
    with an error code (`error_code`), or the overlay stream closed (None)."""

    def __init__(self, message: str, error_code: int | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code


class InvalidRequestHeader(Exception):
    """A request header that HTTP/2 cannot carry (a name that is no token, a CR in a value)."""


class MalformedResponse(Exception):
    """A response header block that RFC 9113 does not allow; its stream was reset."""


class ServerResetStream(Exception):
    """The server reset one HTTP/2 stream (RST_STREAM) with `error_code`."""

    def __init__(self, message: str, error_code: int) -> None:
        super().__init__(message)
        self.error_code = error_code


@contextmanager
def map_errors(phase: Phase, request: httpx.Request, what: str = "") -> Iterator[None]:
    """Re-raise anything that escapes as the httpx exception for `phase`.

    `what` names the peer (e.g. "1:0001.0001.0001 port 80") for the message.
    httpx exceptions pass through untouched.
    """
    where = f" ({what})" if what else ""
    try:
        yield
    except httpx.HTTPError:
        raise
    except TimeoutError as exc:
        # anyio.fail_after raises TimeoutError; HandshakeTimeout is one too.
        if isinstance(exc, HandshakeTimeout):
            raise httpx.ConnectTimeout(f"{exc}", request=request) from exc
        raise _TIMEOUTS[phase](f"{phase} timeout{where}", request=request) from exc
    except (UnknownPeer, PortUnreachable, AddressError) as exc:
        raise httpx.ConnectError(str(exc), request=request) from exc
    except PeerRestarted as exc:
        raise _NETWORK[phase](
            f"{exc}; the request may not have been processed", request=request
        ) from exc
    except (TunnelClosed, StreamReset) as exc:
        raise _NETWORK[phase](str(exc), request=request) from exc
    except ServerResetStream as exc:
        raise httpx.RemoteProtocolError(f"{exc}{where}", request=request) from exc
    except ConnectionLost as exc:
        if exc.error_code:  # the server ended the connection over an HTTP/2 error
            raise httpx.RemoteProtocolError(f"{exc}{where}", request=request) from exc
        raise _NETWORK[phase](f"{exc}{where}", request=request) from exc
    except MalformedResponse as exc:
        raise httpx.RemoteProtocolError(
            f"malformed response{where}: {exc}", request=request
        ) from exc
    except InvalidRequestHeader as exc:
        raise httpx.LocalProtocolError(f"{exc}", request=request) from exc
    except h2.exceptions.ProtocolError as exc:
        raise httpx.RemoteProtocolError(
            f"HTTP/2 protocol error{where}: {exc}", request=request
        ) from exc
    except (anyio.BrokenResourceError, anyio.EndOfStream, anyio.ClosedResourceError) as exc:
        raise _NETWORK[phase](
            f"overlay stream closed during {phase}{where}", request=request
        ) from exc
    except OverlayError as exc:
        raise _NETWORK[phase](str(exc), request=request) from exc
