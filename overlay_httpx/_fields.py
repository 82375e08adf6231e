"""HTTP/2 field checks (RFC 9113 section 8.2) shared by the server and the client.

Both switch h2's own header validation off: it costs a Python loop per header
character, and h2 treats a malformed block as an error of the whole connection,
where RFC 9113 section 8.1.1 makes it an error of one stream. These checks run
in C (compiled regular expressions), once per field.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "BAD_FIELD_VALUE",
    "CONNECTION_HEADERS",
    "FIELD_NAME",
    "H2_FIELD_NAME",
    "connection_specific",
    "field_name_ok",
    "field_value_ok",
]

#: hop-by-hop fields that HTTP/2 forbids (RFC 9113 section 8.2.2)
CONNECTION_HEADERS: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
#: a field name: a token, lowercase as HTTP/2 requires
FIELD_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
#: a field name as RFC 9113 section 8.2.1 lets a peer send it: visible ASCII, no
#: uppercase, no colon. Looser than a token (`FIELD_NAME`): what we take from peers.
H2_FIELD_NAME: Final = re.compile(rb"[\x21-\x39\x3b-\x40\x5b-\x7e]+")
#: what a field value must not hold: NUL, CR or LF anywhere, whitespace at either end
BAD_FIELD_VALUE: Final = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")


def field_name_ok(name: bytes) -> bool:
    """A lowercase token: what HTTP/2 allows as a (non-pseudo) field name."""
    return FIELD_NAME.fullmatch(name) is not None


def field_value_ok(value: bytes) -> bool:
    """No NUL, CR or LF, and no whitespace at either end (RFC 9113 section 8.2.1)."""
    return not value or BAD_FIELD_VALUE.search(value) is None


def connection_specific(name: bytes, value: bytes) -> bool:
    """A field HTTP/2 forbids (RFC 9113 section 8.2.2): a hop-by-hop one, or ``te``
    saying anything but ``trailers``. `name` is lowercase."""
    return name in CONNECTION_HEADERS or (name == b"te" and value.lower() != b"trailers")
