"""One HTTP/2 request header block in, one ASGI ``http`` scope out (or a 400 / 431).

h2's own inbound header validation is switched off (see `_connection`): h2
treats any malformed header block as a connection error, which would tear down
every other request of that peer, while RFC 9113 section 8.1.1 makes it an
error of that one stream. The checks here are RFC 9113's (sections 8.2 and
8.3), made per request in one pass over the headers: a request that fails them
is answered 400 (431 when its header list is over the limit we advertised in
SETTINGS) and the connection carries on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple
from urllib.parse import unquote

from .._address import Address
from .._fields import BAD_FIELD_VALUE, CONNECTION_HEADERS, FIELD_NAME
from .._identity import PublicIdentity
from ._types import Scope

__all__ = [
    "BadRequest",
    "ConnectionInfo",
    "ScopeBuilder",
    "build_scope",
]

_METHOD: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SCHEME: Final = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*")
_TARGET: Final = re.compile(rb"/[\x21-\x7e]*|\*")  # origin-form, or "*" (visible ASCII only)
_ENTRY_OVERHEAD: Final = 32  # RFC 9113 section 6.5.2: each field costs name + value + 32


class BadRequest(Exception):
    """The request's header block is malformed: answer `status` and carry on."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """What every request of one connection shares, gathered once per connection."""

    server: tuple[str, int]
    client: tuple[str, int]
    root_path: str
    peer_address: Address
    peer_identity: PublicIdentity
    path: Callable[[], str]
    """The tunnel's current path, "direct" or "relayed" (it can change under a connection)."""
    max_header_list_size: int
    max_body_size: int | None
    """Request body bytes allowed (None: no limit); beyond it the client gets 413."""
    state: dict[str, Any] | None
    """The lifespan state, copied into every request; None when lifespan did not run."""


class _Parsed(NamedTuple):
    """What `build_scope` reads from a header list: all of the scope that depends on it."""

    method: str
    scheme: str
    path: str
    raw_path: bytes
    query_string: bytes
    fields: tuple[tuple[bytes, bytes], ...]
    size: int  # the header list's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it


def build_scope(headers: Iterable[tuple[bytes, bytes]], info: ConnectionInfo) -> Scope:
    """The ASGI http scope for one request, or `BadRequest` if its header block is malformed.

    ``path`` and ``raw_path`` start with ``root_path``, as uvicorn's do (the
    ASGI spec's reading since 2023, which Starlette relies on); ``:authority``
    becomes a ``host`` header when the request carries none.
    """
    return _assemble(_parse(headers, info), info)


class ScopeBuilder:
    """`build_scope` for the requests of one connection, remembering what it parsed.

    A client sends the same header list again and again; parsing and checking
    it is most of what a scope costs, and its outcome depends only on the list
    and the connection. Every scope is still a new dict with a new header list
    (apps may change them), and the parts that can change between requests
    (the tunnel's path, the lifespan state) are read each time. Lists that fail
    the checks are never remembered, nor large ones, and at most
    `MAX_REMEMBERED` lists are.
    """

    MAX_REMEMBERED: Final = 32
    _MAX_SIZE: Final = 4096

    __slots__ = ("_info", "_parsed")

    def __init__(self, info: ConnectionInfo) -> None:
        self._info = info
        self._parsed: dict[tuple[tuple[bytes, bytes], ...], _Parsed] = {}

    def build(self, headers: Iterable[tuple[bytes, bytes]]) -> Scope:
        """Like ``build_scope(headers, info)``."""
        info = self._info
        key = tuple(headers)
        try:
            parsed = self._parsed.get(key)
        except TypeError:  # something unhashable: not from h2, which gives bytes
            return build_scope(key, info)
        if parsed is None:
            parsed = _parse(key, info)  # raises BadRequest: never remembered
            if parsed.size <= self._MAX_SIZE:
                if len(self._parsed) >= self.MAX_REMEMBERED:
                    self._parsed.clear()
                self._parsed[key] = parsed
        return _assemble(parsed, info)


def _parse(headers: Iterable[tuple[bytes, bytes]], info: ConnectionInfo) -> _Parsed:
    """Check a request's header list (RFC 9113 sections 8.2 and 8.3) and take it apart."""
    method = scheme = target = authority = None
    fields: list[tuple[bytes, bytes]] = []
    size = 0
    has_host = False
    regular = False
    for name, value in headers:
        size += len(name) + len(value) + _ENTRY_OVERHEAD
        if value and BAD_FIELD_VALUE.search(value) is not None:
            raise BadRequest(400, f"invalid characters in the value of {name!r}")
        if name[:1] == b":":
            if regular:
                raise BadRequest(400, f"pseudo-header {name!r} after a regular header")
            if name == b":method" and method is None:
                method = value
            elif name == b":path" and target is None:
                target = value
            elif name == b":scheme" and scheme is None:
                scheme = value
            elif name == b":authority" and authority is None:
                authority = value
            else:
                raise BadRequest(400, f"unexpected or repeated pseudo-header {name!r}")
            continue
        regular = True
        if FIELD_NAME.fullmatch(name) is None:
            raise BadRequest(400, f"invalid header name {name!r}")
        if name in CONNECTION_HEADERS:
            raise BadRequest(400, f"connection-specific header {name!r} in an HTTP/2 request")
        if name == b"te" and value.lower() != b"trailers":
            raise BadRequest(400, "the te header may only say 'trailers' in HTTP/2")
        if name == b"host":
            has_host = True
        fields.append((name, value))
    if size > info.max_header_list_size:
        raise BadRequest(431, f"header list of {size} bytes, over {info.max_header_list_size}")
    if method is None or _METHOD.fullmatch(method) is None:
        raise BadRequest(400, "missing or invalid :method")
    if scheme is None or _SCHEME.fullmatch(scheme) is None:
        raise BadRequest(400, "missing or invalid :scheme")
    if target is None or _TARGET.fullmatch(target) is None:
        raise BadRequest(400, "missing or invalid :path (origin-form, visible ASCII)")
    if authority is not None and not has_host:
        fields.insert(0, (b"host", authority))
    raw_path, _, query = target.partition(b"?")
    root_path = info.root_path
    return _Parsed(
        method=method.decode("ascii"),
        scheme=scheme.decode("ascii"),
        path=root_path + unquote(raw_path.decode("ascii")),
        raw_path=root_path.encode() + raw_path if root_path else raw_path,
        query_string=query,
        fields=tuple(fields),
        size=size,
    )


def _assemble(parsed: _Parsed, info: ConnectionInfo) -> Scope:
    """A new scope dict from a parsed header list and the connection."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "2",
        "method": parsed.method,
        "scheme": parsed.scheme,
        "path": parsed.path,
        "raw_path": parsed.raw_path,
        "query_string": parsed.query_string,
        "root_path": info.root_path,
        "headers": list(parsed.fields),
        "server": info.server,
        "client": info.client,
        "extensions": {
            "overlay": {
                "peer_address": info.peer_address,
                "peer_identity": info.peer_identity,
                "path": info.path(),
            }
        },
    }
    if info.state is not None:
        scope["state"] = info.state.copy()
    return scope
