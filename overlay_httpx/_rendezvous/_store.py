"""The registry store: who owns which address, and where each live node can be reached.

The rendezvous keeps two kinds of facts, with different lifetimes:

* **Claims** bind an overlay address to a public key, permanently. Once a key
  has claimed an address, no other key can ever register it, across record
  expiry and server restarts; and a key holds at most one address.
* **Records** say where a node is right now (the UDP endpoint the rendezvous
  observed, the node's own interface endpoints, its tags and hostname). They
  live for `ttl` seconds after the node's last heartbeat; only live records
  answer queries, and a hostname is released when its holder's record expires.

`Store` is a `typing.Protocol` so a shared database can later serve several
rendezvous servers; `SqliteStore` is the stdlib implementation. Time is always
passed in explicitly (``now``, ``last_seen``: wall-clock seconds), which keeps
expiry deterministic and testable.

The validators (`validate_tag`, `validate_tags`, `validate_hostname`,
`parse_endpoint_text`) and `NodeRecord.from_json` treat their input as hostile and
raise `RegistryProtocolError` (code ``"bad_request"``) with one readable line.
Every database failure becomes `StoreError` naming the database and the cause.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, NoReturn, Protocol, TypeAlias

from .._address import HOST_SUFFIX, Address
from .._exceptions import (
    AddressError,
    AddressTaken,
    HostnameTaken,
    IdentityCorrupt,
    OverlayError,
    RegistryProtocolError,
    StoreError,
)
from .._identity import PublicIdentity
from ._messages import describe

__all__ = [
    "MAX_LOCAL_ENDPOINTS",
    "MAX_TAGS",
    "SCHEMA_VERSION",
    "Endpoint",
    "NodeRecord",
    "SqliteStore",
    "Store",
    "format_endpoint",
    "parse_endpoint_text",
    "validate_hostname",
    "validate_tag",
    "validate_tags",
]

Endpoint: TypeAlias = tuple[str, int]
"""A UDP endpoint: (IP address text, port)."""

MAX_TAGS: Final = 16
MAX_LOCAL_ENDPOINTS: Final = 8
SCHEMA_VERSION: Final = 1

_TAG_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
_LABEL_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ADDRESS_HOST_RE: Final = re.compile(r"[0-9]+-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}")
_PORT_RE: Final = re.compile(r"[0-9]{1,5}")
_MAX_HOSTNAME: Final = 253
_TAG_RULE: Final = "a lowercase DNS label of 1-32 characters (a-z, 0-9, '-' but not at either end)"
_HOSTNAME_RULE: Final = (
    "a lowercase DNS name (dot-separated labels of 1-63 characters: a-z, 0-9, "
    f"'-' but not at either end; at most {_MAX_HOSTNAME} characters)"
)
_ENDPOINT_RULE: Final = "'IP:port' (IPv6 as '[IP]:port', port 1..65535)"


def _bad(message: str) -> NoReturn:
    raise RegistryProtocolError(message, code="bad_request")


# -- validators ----------------------------------------------------------------


def validate_tag(tag: object) -> str:
    """Return `tag` if it is a valid tag (a lowercase DNS label of 1-32 characters)."""
    if not isinstance(tag, str):
        _bad(f"invalid tag {describe(tag)}: expected {_TAG_RULE}")
    if _TAG_RE.fullmatch(tag) is None:
        _bad(f"invalid tag {describe(tag)}: expected {_TAG_RULE}")
    return tag


def validate_tags(tags: object, *, max_tags: int = MAX_TAGS) -> tuple[str, ...]:
    """A list of tags as a sorted tuple without duplicates; at most `max_tags` given."""
    if not isinstance(tags, (list, tuple)):
        _bad(f"'tags': expected a list of at most {max_tags} tags, got {describe(tags)}")
    if len(tags) > max_tags:
        _bad(f"too many tags: {len(tags)} given, at most {max_tags} allowed")
    return tuple(sorted({validate_tag(tag) for tag in tags}))


def validate_hostname(name: object) -> str | None:
    """Return `name` if it is ``None`` or a hostname a node may hold."""
    if name is None:
        return None
    if not isinstance(name, str):
        _bad(f"invalid hostname {describe(name)}: expected {_HOSTNAME_RULE} or null")
    if len(name) > _MAX_HOSTNAME:
        _bad(f"invalid hostname {describe(name)}: longer than {_MAX_HOSTNAME} characters")
    labels = name.split(".")
    if not all(_LABEL_RE.fullmatch(label) for label in labels):
        _bad(f"invalid hostname {describe(name)}: expected {_HOSTNAME_RULE}")
    if labels[-1] == "tag":
        _bad(f"invalid hostname {describe(name)}: the last label 'tag' is reserved for tag queries")
    if name.endswith(HOST_SUFFIX):
        _bad(f"invalid hostname {describe(name)}: must not end with {HOST_SUFFIX!r}")
    if _ADDRESS_HOST_RE.fullmatch(name) is not None:
        _bad(f"invalid hostname {describe(name)}: looks like an overlay address host")
    return name


def format_endpoint(ep: Endpoint) -> str:
    """``"1.2.3.4:5"``, or ``"[::1]:5"`` for IPv6."""
    host, port = ep
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint_text(text: object, *, field: str = "endpoint") -> Endpoint:
    """Inverse of `format_endpoint`: the host must be an IP literal, the port 1..65535.

    The host comes back in its canonical text form (``"::0001"`` -> ``"::1"``).
    IPv6 scope ids (``%eth0``) are refused: they mean nothing to another host.
    """
    if not isinstance(text, str) or not text.isascii():
        _bad(f"'{field}': expected {_ENDPOINT_RULE}, got {describe(text)}")
    if text.startswith("["):
        host_text, sep, port_text = text[1:].partition("]:")
        if not sep or ":" not in host_text:
            _bad(f"'{field}': expected {_ENDPOINT_RULE}, got {describe(text)}")
    else:
        host_text, sep, port_text = text.rpartition(":")
        if not sep or ":" in host_text:
            _bad(f"'{field}': expected {_ENDPOINT_RULE}, got {describe(text)}")
    if _PORT_RE.fullmatch(port_text) is None or not 1 <= int(port_text) <= 0xFFFF:
        _bad(f"'{field}': port must be 1..65535, got {describe(text)}")
    if "%" in host_text:
        _bad(f"'{field}': IPv6 scope ids are not allowed, got {describe(text)}")
    try:
        host = ipaddress.ip_address(host_text)
    except ValueError:
        _bad(f"'{field}': host must be an IP address, got {describe(text)}")
    return (str(host), int(port_text))


def _check_endpoint(ep: object, field: str) -> str:
    """The canonical text of an Endpoint tuple; RegistryProtocolError if it is not one."""
    if (
        not isinstance(ep, tuple)
        or len(ep) != 2
        or not isinstance(ep[0], str)
        or isinstance(ep[1], bool)
        or not isinstance(ep[1], int)
    ):
        _bad(f"'{field}': expected a (host, port) tuple, got {describe(ep)}")
    return format_endpoint(parse_endpoint_text(format_endpoint(ep), field=field))


# -- records ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """Where a registered node can be reached right now, and what it calls itself."""

    address: Address
    identity: PublicIdentity
    endpoint: Endpoint
    """The public UDP endpoint, as the rendezvous observed it."""
    local_endpoints: tuple[Endpoint, ...]
    """What the node reports for its own interfaces (at most 8)."""
    tags: tuple[str, ...]
    """Sorted, unique."""
    hostname: str | None
    last_seen: float
    """Wall-clock seconds (``time.time()`` style) of the last registration or heartbeat."""

    def to_json(self) -> dict[str, object]:
        """The JSON object form (what `from_json` reads back)."""
        return {
            "address": str(self.address),
            "identity": str(self.identity),
            "endpoint": format_endpoint(self.endpoint),
            "local_endpoints": [format_endpoint(ep) for ep in self.local_endpoints],
            "tags": list(self.tags),
            "hostname": self.hostname,
            "last_seen": self.last_seen,
        }

    @classmethod
    def from_json(cls, obj: object) -> NodeRecord:
        """Read the `to_json` form strictly; `RegistryProtocolError` on any bad or missing field.

        Keys it does not know are ignored, so a newer rendezvous may add fields.
        """
        if not isinstance(obj, dict):
            _bad(f"record: expected an object, got {describe(obj)}")
        for key in ("address", "identity", "endpoint", "local_endpoints", "tags", "last_seen"):
            if key not in obj:
                _bad(f"record '{key}': missing")

        raw_address = obj["address"]
        try:
            if not isinstance(raw_address, str):
                raise AddressError("not a string")
            address = Address.parse(raw_address)
        except AddressError:
            _bad(
                "record 'address': expected an overlay address like '1:0001.0001.0001', "
                f"got {describe(raw_address)}"
            )

        raw_identity = obj["identity"]
        try:
            if not isinstance(raw_identity, str):
                raise IdentityCorrupt("not a string")
            identity = PublicIdentity.parse(raw_identity)
        except (IdentityCorrupt, ValueError):
            _bad(
                f"record 'identity': expected a public identity text, got {describe(raw_identity)}"
            )

        endpoint = parse_endpoint_text(obj["endpoint"], field="record 'endpoint'")

        raw_locals = obj["local_endpoints"]
        if not isinstance(raw_locals, list) or len(raw_locals) > MAX_LOCAL_ENDPOINTS:
            _bad(
                f"record 'local_endpoints': expected a list of at most {MAX_LOCAL_ENDPOINTS} "
                f"endpoints, got {describe(raw_locals)}"
            )
        local_endpoints = tuple(
            parse_endpoint_text(ep, field="record 'local_endpoints'") for ep in raw_locals
        )

        tags = validate_tags(obj["tags"])
        hostname = validate_hostname(obj.get("hostname"))

        last_seen = obj["last_seen"]
        if (
            isinstance(last_seen, bool)
            or not isinstance(last_seen, (int, float))
            or not math.isfinite(last_seen)
        ):
            _bad(f"record 'last_seen': expected a finite number, got {describe(last_seen)}")
        return cls(address, identity, endpoint, local_endpoints, tags, hostname, float(last_seen))


# -- the store -------------------------------------------------------------------


class Store(Protocol):
    """What the rendezvous needs from its registry database.

    ``now`` and ``last_seen`` are wall-clock seconds; a record is live while
    ``last_seen + ttl > now``. Queries return live records only.
    """

    ttl: float

    def claim(self, address: Address, identity: PublicIdentity) -> None:
        """Bind `address` to `identity` forever; `AddressTaken` if either is bound elsewhere."""
        ...

    def put(self, record: NodeRecord) -> None:
        """Insert or replace the presence record of ``record.address``.

        `AddressTaken` unless that address was claimed by ``record.identity``;
        `HostnameTaken` if another live record holds the hostname.
        """
        ...

    def get(self, address: Address, now: float) -> NodeRecord | None: ...

    def by_hostname(self, hostname: str, now: float) -> NodeRecord | None: ...

    def by_tag(self, tag: str, now: float) -> list[NodeRecord]:
        """Live records carrying `tag`, sorted by address."""
        ...

    def all(self, now: float) -> list[NodeRecord]:
        """Every live record, sorted by address."""
        ...

    def remove(self, address: Address) -> None:
        """Drop the presence record of `address` (its claim stays)."""
        ...

    def evict(self, address: Address) -> None:
        """Drop the claim of `address` and its record (for an owner with a stronger right)."""
        ...

    def expire(self, now: float) -> int:
        """Delete records that are no longer live (claims stay); return how many."""
        ...

    def close(self) -> None: ...


_SCHEMA: Final = (
    """
    CREATE TABLE claims (
        address  INTEGER PRIMARY KEY,
        identity BLOB NOT NULL UNIQUE
    )
    """,
    """
    CREATE TABLE records (
        address         INTEGER PRIMARY KEY REFERENCES claims (address),
        endpoint        TEXT NOT NULL,
        local_endpoints TEXT NOT NULL,
        hostname        TEXT,
        last_seen       REAL NOT NULL
    )
    """,
    "CREATE UNIQUE INDEX records_hostname ON records (hostname) WHERE hostname IS NOT NULL",
    "CREATE INDEX records_last_seen ON records (last_seen)",
    """
    CREATE TABLE tags (
        tag     TEXT NOT NULL,
        address INTEGER NOT NULL REFERENCES records (address) ON DELETE CASCADE,
        PRIMARY KEY (tag, address)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX tags_address ON tags (address)",
)

_LIVE: Final = "r.last_seen + ? > ?"
_SELECT_RECORDS: Final = (
    "SELECT r.address, c.identity, r.endpoint, r.local_endpoints, r.hostname, r.last_seen "
    "FROM records AS r JOIN claims AS c ON c.address = r.address "
    f"WHERE {_LIVE} AND {{where}} ORDER BY r.address"
)
_SELECT_TAGS: Final = (
    "SELECT t.address, t.tag FROM tags AS t JOIN records AS r ON r.address = t.address "
    f"WHERE {_LIVE} AND {{where}} ORDER BY t.address, t.tag"
)

_RecordRow: TypeAlias = tuple[int, bytes, str, str, "str | None", float]


class SqliteStore:
    """`Store` on the stdlib `sqlite3`: ``":memory:"`` by default, or a file that persists.

    File databases use the WAL journal; the schema version lives in
    ``PRAGMA user_version`` and a database written by a newer version is
    refused. One connection serves every thread (calls are serialised by a
    lock; each is one short transaction).
    """

    def __init__(self, path: str | os.PathLike[str] = ":memory:", *, ttl: float = 90.0) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        if not math.isfinite(ttl):
            raise ValueError(f"ttl must be finite, got {ttl!r}")
        self.ttl = float(ttl)
        self._lock = threading.Lock()
        try:
            self._path = os.fspath(path)
        except TypeError:
            raise StoreError(f"registry database path must be a string, got {path!r}") from None
        self._conn: sqlite3.Connection | None = None
        with self._errors():
            try:
                conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            except ValueError as exc:  # e.g. an embedded NUL character
                raise sqlite3.OperationalError(str(exc)) from None
            try:
                self._setup(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn

    # -- setup -------------------------------------------------------------

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA foreign_keys = ON")
        if self._path not in (":memory:", ""):
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"registry database {self._path!r} has schema version {version}, newer than "
                    f"the {SCHEMA_VERSION} this version of overlay_httpx understands"
                )
            if version == 0:
                (tables,) = conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
                ).fetchone()
                if tables:
                    raise StoreError(
                        f"registry database {self._path!r} is an SQLite database of something "
                        "else (it has tables but no registry schema version)"
                    )
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            cause = " ".join(str(exc).split()) or type(exc).__name__
            raise StoreError(f"registry database {self._path!r}: {cause}") from exc

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors():
            conn = self._conn
            if conn is None:
                raise sqlite3.ProgrammingError("the store is closed")
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- claims and records -------------------------------------------------

    def claim(self, address: Address, identity: PublicIdentity) -> None:
        key = identity.to_bytes()
        with self._transaction(write=True) as conn:
            row = conn.execute(
                "SELECT identity FROM claims WHERE address = ?", (int(address),)
            ).fetchone()
            if row is not None:
                if bytes(row[0]) == key:
                    return
                owner = self._fingerprint(row[0])
                raise AddressTaken(
                    f"address {address} belongs to another key (fingerprint {owner})"
                )
            row = conn.execute("SELECT address FROM claims WHERE identity = ?", (key,)).fetchone()
            if row is not None:
                held = self._address(row[0])
                raise AddressTaken(
                    f"this key (fingerprint {identity.fingerprint}) already holds address {held}"
                )
            conn.execute(
                "INSERT INTO claims (address, identity) VALUES (?, ?)", (int(address), key)
            )

    def put(self, record: NodeRecord) -> None:
        endpoint = _check_endpoint(record.endpoint, "endpoint")
        if len(record.local_endpoints) > MAX_LOCAL_ENDPOINTS:
            _bad(
                f"'local_endpoints': at most {MAX_LOCAL_ENDPOINTS} endpoints allowed, "
                f"got {len(record.local_endpoints)}"
            )
        local = [_check_endpoint(ep, "local_endpoints") for ep in record.local_endpoints]
        tags = validate_tags(record.tags)
        hostname = validate_hostname(record.hostname)
        last_seen = record.last_seen
        if (
            isinstance(last_seen, bool)
            or not isinstance(last_seen, (int, float))
            or not math.isfinite(last_seen)
        ):
            _bad(f"'last_seen': expected a finite number, got {describe(last_seen)}")
        address = int(record.address)
        key = record.identity.to_bytes()
        with self._transaction(write=True) as conn:
            row = conn.execute(
                "SELECT identity FROM claims WHERE address = ?", (address,)
            ).fetchone()
            if row is None or bytes(row[0]) != key:
                raise AddressTaken(
                    f"address {record.address} is not claimed by this key "
                    f"(fingerprint {record.identity.fingerprint})"
                )
            if hostname is not None:
                holder = conn.execute(
                    "SELECT address FROM records AS r "
                    f"WHERE r.hostname = ? AND r.address != ? AND {_LIVE}",
                    (hostname, address, self.ttl, last_seen),
                ).fetchone()
                if holder is not None:
                    raise HostnameTaken(
                        f"hostname {hostname!r} is held by another live node "
                        f"({self._address(holder[0])})"
                    )
                # Whoever else still has it in a row is expired: release it.
                conn.execute(
                    "UPDATE records SET hostname = NULL WHERE hostname = ? AND address != ?",
                    (hostname, address),
                )
            conn.execute(
                "INSERT INTO records (address, endpoint, local_endpoints, hostname, last_seen) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (address) DO UPDATE SET "
                "endpoint = excluded.endpoint, local_endpoints = excluded.local_endpoints, "
                "hostname = excluded.hostname, last_seen = excluded.last_seen",
                (address, endpoint, json.dumps(local), hostname, float(last_seen)),
            )
            conn.execute("DELETE FROM tags WHERE address = ?", (address,))
            conn.executemany(
                "INSERT INTO tags (tag, address) VALUES (?, ?)", [(tag, address) for tag in tags]
            )

    def get(self, address: Address, now: float) -> NodeRecord | None:
        found = self._select("r.address = ?", (int(address),), now)
        return found[0] if found else None

    def by_hostname(self, hostname: str, now: float) -> NodeRecord | None:
        found = self._select("r.hostname = ?", (hostname,), now)
        return found[0] if found else None

    def by_tag(self, tag: str, now: float) -> list[NodeRecord]:
        return self._select(
            "r.address IN (SELECT t2.address FROM tags AS t2 WHERE t2.tag = ?)", (tag,), now
        )

    def all(self, now: float) -> list[NodeRecord]:
        return self._select("1", (), now)

    def remove(self, address: Address) -> None:
        with self._transaction(write=True) as conn:
            conn.execute("DELETE FROM tags WHERE address = ?", (int(address),))
            conn.execute("DELETE FROM records WHERE address = ?", (int(address),))

    def evict(self, address: Address) -> None:
        with self._transaction(write=True) as conn:
            for table in ("tags", "records", "claims"):
                conn.execute(f"DELETE FROM {table} WHERE address = ?", (int(address),))

    def expire(self, now: float) -> int:
        dead = "SELECT address FROM records WHERE last_seen + ? <= ?"
        with self._transaction(write=True) as conn:
            conn.execute(f"DELETE FROM tags WHERE address IN ({dead})", (self.ttl, now))
            cursor = conn.execute(f"DELETE FROM records WHERE address IN ({dead})", (self.ttl, now))
            return cursor.rowcount

    def close(self) -> None:
        with self._lock, self._errors():
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"SqliteStore({self._path!r}, ttl={self.ttl}, {state})"

    # -- reading rows ------------------------------------------------------------

    def _select(self, where: str, params: tuple[object, ...], now: float) -> list[NodeRecord]:
        live = (self.ttl, now)
        with self._transaction(write=False) as conn:
            rows: list[_RecordRow] = conn.execute(
                _SELECT_RECORDS.format(where=where), (*live, *params)
            ).fetchall()
            tag_rows: list[tuple[int, str]] = conn.execute(
                _SELECT_TAGS.format(where=where), (*live, *params)
            ).fetchall()
        tags: dict[int, list[str]] = {}
        for address, tag in tag_rows:
            tags.setdefault(address, []).append(tag)
        return [self._decode(row, tags.get(row[0], [])) for row in rows]

    def _decode(self, row: _RecordRow, tags: list[str]) -> NodeRecord:
        address, identity, endpoint, local_endpoints, hostname, last_seen = row
        try:
            locals_list = json.loads(local_endpoints)
            if not isinstance(locals_list, list):
                raise ValueError("local_endpoints is not a list")
            return NodeRecord(
                address=Address.from_int(address),
                identity=PublicIdentity.from_bytes(bytes(identity)),
                endpoint=parse_endpoint_text(endpoint),
                local_endpoints=tuple(parse_endpoint_text(ep) for ep in locals_list),
                tags=tuple(tags),
                hostname=validate_hostname(hostname),
                last_seen=float(last_seen),
            )
        except (OverlayError, ValueError, TypeError) as exc:
            cause = " ".join(str(exc).split())
            raise StoreError(
                f"registry database {self._path!r}: corrupt record for address {address!r}: {cause}"
            ) from None

    def _address(self, value: int) -> str:
        try:
            return str(Address.from_int(value))
        except AddressError:
            return f"<corrupt address {value!r}>"

    def _fingerprint(self, value: bytes) -> str:
        try:
            return PublicIdentity.from_bytes(bytes(value)).fingerprint
        except (IdentityCorrupt, TypeError, ValueError):
            return "<corrupt key>"
