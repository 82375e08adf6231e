"""`ReverseProxy`: an ASGI app that forwards every request to an HTTP/1.1 upstream.

``overlay-httpx expose`` serves it on an overlay port, so overlay clients
(which speak HTTP/2 through `OverlayTransport`) reach a service that only
speaks HTTP/1.1 on a local TCP port, such as uvicorn. Bodies stream both
ways; hop-by-hop headers stay on their hop. The upstream learns who called
from ``x-overlay-peer-address`` and ``x-overlay-peer-identity``, which the
tunnel's handshake proved (the same headers from the caller are dropped, so
they cannot be forged). It talks to the upstream through one
`httpx.AsyncHTTPTransport`, whose pool keeps connections alive; a client's
cookie jar, redirects and default headers have no place in a proxy.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Final

import httpx

from .._asgi import ClientDisconnected
from .._asgi._types import Message, Receive, Scope, Send

__all__ = ["HOP_BY_HOP", "ReverseProxy"]

logger = logging.getLogger("overlay_httpx.cli")

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_REPLACED: Final = frozenset({b"host", b"x-forwarded-host", b"x-forwarded-proto"})
_OURS: Final = b"x-overlay-"
_DEFAULT_TIMEOUT: Final = httpx.Timeout(10.0, read=None, write=None, pool=None)


class _Disconnected(Exception):
    """The overlay client went away while its request body was being forwarded."""


def _without_hop_by_hop(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    drop = HOP_BY_HOP | named
    return [(name.lower(), value) for name, value in headers if name.lower() not in drop]


class ReverseProxy:
    """Forward each HTTP request to `upstream` (``http://host:port``) and stream back the answer.

    An upstream that cannot be reached gives 502 (504 when connecting timed
    out) with a one-line text body; the caller going away stops the upstream
    exchange.
    """

    def __init__(
        self,
        upstream: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: httpx.Timeout = _DEFAULT_TIMEOUT,
    ) -> None:
        self._base = httpx.URL(upstream)
        self._owned = transport is None
        self._closed = False
        self._transport = transport or httpx.AsyncHTTPTransport(retries=0)
        self._timeout = timeout.as_dict()

    @property
    def upstream(self) -> httpx.URL:
        return self._base

    async def aclose(self) -> None:
        """Close the upstream connection pool (if the proxy made it)."""
        if self._owned and not self._closed:
            self._closed = True
            await self._transport.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise RuntimeError(f"ReverseProxy serves HTTP only, not {scope['type']!r}")
        first = await receive()
        if first["type"] == "http.disconnect":
            return
        streamed = first.get("more_body", False)
        content: bytes | AsyncIterator[bytes] = (
            _body(first, receive) if streamed else first.get("body", b"")
        )
        request = httpx.Request(
            scope["method"],
            self._url(scope),
            headers=self._request_headers(scope),
            content=content,
            extensions={"timeout": self._timeout},
        )
        try:
            response = await self._transport.handle_async_request(request)
        except _Disconnected:
            return
        except httpx.TimeoutException as exc:
            await self._fail(send, 504, f"timed out: {exc or type(exc).__name__}")
            return
        except httpx.TransportError as exc:
            await self._fail(send, 502, f"unreachable: {exc or type(exc).__name__}")
            return
        try:
            await self._respond(response, send)
        except ClientDisconnected:
            pass
        finally:
            await response.aclose()

    def _url(self, scope: Scope) -> httpx.URL:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        return self._base.copy_with(raw_path=raw_path + (b"?" + query if query else b""))

    def _request_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        fields: list[tuple[bytes, bytes]] = scope["headers"]
        kept = [
            (name, value)
            for name, value in _without_hop_by_hop(fields)
            if name not in _REPLACED and not name.startswith(_OURS)
        ]
        host = next((value for name, value in fields if name.lower() == b"host"), None)
        if host is not None:
            kept.append((b"x-forwarded-host", host))
        kept.append((b"x-forwarded-proto", b"http"))
        overlay = scope.get("extensions", {}).get("overlay")
        if overlay is not None:
            kept.append((b"x-overlay-peer-address", str(overlay["peer_address"]).encode()))
            kept.append((b"x-overlay-peer-identity", str(overlay["peer_identity"]).encode()))
        return kept

    async def _respond(self, response: httpx.Response, send: Send) -> None:
        start: Message = {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": _without_hop_by_hop(list(response.headers.raw)),
        }
        await send(start)
        async for chunk in response.aiter_raw():
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _fail(self, send: Send, status: int, what: str) -> None:
        message = f"upstream {self._base} {what}"
        logger.warning("%s", message)
        body = (message + "\n").encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _body(first: Message, receive: Receive) -> AsyncIterator[bytes]:
    """The request body, read from the overlay client as the upstream takes it."""
    message = first
    while True:
        chunk: bytes = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
