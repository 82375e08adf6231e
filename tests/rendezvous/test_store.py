from __future__ import annotations

import json
import os
import sqlite3
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay_httpx._address import Address
from overlay_httpx._exceptions import (
    AddressTaken,
    HostnameTaken,
    RegistryError,
    RegistryProtocolError,
    StoreError,
)
from overlay_httpx._identity import Identity, PublicIdentity
from overlay_httpx._rendezvous._store import (
    SCHEMA_VERSION,
    NodeRecord,
    SqliteStore,
    Store,
    format_endpoint,
    parse_endpoint_text,
    validate_hostname,
    validate_tag,
    validate_tags,
)

TTL = 90.0
A1 = Address.parse("1:0001.0000.0001")
A2 = Address.parse("1:0001.0000.0002")
A3 = Address.parse("1:0001.0000.0003")


@pytest.fixture(scope="module")
def keys() -> list[PublicIdentity]:
    return [Identity.generate().public for _ in range(4)]


@pytest.fixture
def store() -> Iterator[SqliteStore]:
    s = SqliteStore(ttl=TTL)
    yield s
    s.close()


def rec(
    address: Address,
    identity: PublicIdentity,
    *,
    last_seen: float = 1000.0,
    tags: tuple[str, ...] = (),
    hostname: str | None = None,
    endpoint: tuple[str, int] = ("203.0.113.5", 4000),
    local: tuple[tuple[str, int], ...] = (("10.0.0.2", 4000),),
) -> NodeRecord:
    return NodeRecord(address, identity, endpoint, local, tags, hostname, last_seen)


def test_sqlite_store_satisfies_the_protocol() -> None:
    s: Store = SqliteStore()
    assert s.ttl == 90.0
    s.close()


# -- claims ------------------------------------------------------------------------


def test_claim_is_idempotent_for_the_same_pair(
    store: SqliteStore, keys: list[PublicIdentity]
) -> None:
    store.claim(A1, keys[0])
    store.claim(A1, keys[0])


def test_claim_of_an_address_held_by_another_key(
    store: SqliteStore, keys: list[PublicIdentity]
) -> None:
    store.claim(A1, keys[0])
    with pytest.raises(
        AddressTaken, match=r"address 1:0001\.0000\.0001 belongs to another key"
    ) as ei:
        store.claim(A1, keys[1])
    assert keys[0].fingerprint in str(ei.value)
    assert ei.value.code == "address_taken"


def test_claim_by_a_key_that_already_holds_another_address(
    store: SqliteStore, keys: list[PublicIdentity]
) -> None:
    store.claim(A1, keys[0])
    with pytest.raises(AddressTaken, match=r"already holds address 1:0001\.0000\.0001"):
        store.claim(A2, keys[0])
    # The failed claim left nothing behind: another key can still take A2.
    store.claim(A2, keys[1])


def test_claims_survive_record_expiry(store: SqliteStore, keys: list[PublicIdentity]) -> None:
    store.claim(A1, keys[0])
    store.put(rec(A1, keys[0], last_seen=0.0))
    assert store.expire(1000.0) == 1
    with pytest.raises(AddressTaken):
        store.claim(A1, keys[1])


# -- put -----------------------------------------------------------------------------


def test_put_without_claim(store: SqliteStore, keys: list[PublicIdentity]) -> None:
    with pytest.raises(AddressTaken, match="not claimed by this key"):
        store.put(rec(A1, keys[0]))


def test_put_with_someone_elses_claim(store: SqliteStore, keys: list[PublicIdentity]) -> None:
    store.claim(A1, keys[0])
    with pytest.raises(AddressTaken):
        store.put(rec(A1, keys[1]))
    assert store.get(A1, 1000.0) is None


def test_put_get_round_trip_and_upsert(store: SqliteStore, keys: list[PublicIdentity]) -> None:
    store.claim(A1, keys[0])
    first = rec(A1, keys[0], tags=("gpu", "a100"), hostname="llm")
    store.put(first)
    got = store.get(A1, 1000.0)
    assert got == rec(A1, keys[0], tags=("a100", "gpu"), hostname="llm")
    second = rec(
        A1,
        keys[0],
        last_seen=1010.0,
        tags=("cpu",),
        hostname=None,
        endpoint=("2001:db8::1", 5000),
        local=(),
    )
    store.put(second)
    assert store.get(A1, 1010.0) == second
    assert store.by_tag("gpu", 1010.0) == []
    assert store.by_hostname("llm", 1010.0) is None


def test_put_rejects_bad_fields(store: SqliteStore, keys: list[PublicIdentity]) -> None:
    store.claim(A1, keys[0])
    with pytest.raises(RegistryProtocolError, match="'Bad'"):
        store.put(rec(A1, keys[0], tags=("Bad",)))
    with pytest.raises(RegistryProtocolError, match=r"'x\.tag'"):
        store.put(rec(A1, keys[0], hostname="x.tag"))
    with pytest.raises(RegistryProtocolError, match="port"):
        store.put(rec(A1, keys[0], endpoint=("1.2.3.4", 0)))
    with pytest.raises(RegistryProtocolError, match="at most 8"):
        store.put(rec(A1, keys[0], local=(("10.0.0.1", 1),) * 9))
    with pytest.raises(RegistryProtocolError, match="last_seen"):
        store.put(rec(A1, keys[0], last_seen=float("nan")))
    assert store.get(A1, 1000.0) is None


# -- hostnames -------------------------------------------------------------------------


def test_hostname_is_unique_among_live_records(
    store: SqliteStore, keys: list[PublicIdentity]
) -> None:
    store.claim(A1, keys[0])
    store.claim(A2, keys[1])
    store.put(rec(A1, keys[0], hostname="llm", last_seen=1000.0))
    with pytest.raises(HostnameTaken, match=r"'llm'.*1:0001\.0000\.0001") as ei:
        store.put(rec(A2, keys[1], hostname="llm", last_seen=1000.0 + TTL - 1))
    assert ei.value.code == "hostname_taken"
    # The holder itself may re-register with it.
    store.put(rec(A1, keys[0], hostname="llm", last_seen=1050.0))
    found = store.by_hostname("llm", 1060.0)
    assert found is not None
    assert found.address == A1


def test_hostname_is_released_on_expiry(store: SqliteStore, keys: list[PublicIdentity]) -> None:
    store.claim(A1, keys[0])
    store.claim(A2, keys[1])
    store.put(rec(A1, keys[0], hostname="llm", last_seen=1000.0))
    assert store.by_hostname("llm", 1000.0 + TTL) is None  # last_seen + ttl > now is false
    store.put(rec(A2, keys[1], hostname="llm", last_seen=1000.0 + TTL))
    found = store.by_hostname("llm", 1000.0 + TTL)
    assert found is not None
    assert found.address == A2
    # The old holder comes back: the name is no longer its own.
    with pytest.raises(HostnameTaken):
        store.put(rec(A1, keys[0], hostname="llm", last_seen=1100.0))
    store.put(rec(A1, keys[0], hostname="llm2", last_seen=1100.0))
    assert [r.hostname for r in store.all(1100.0)] == ["llm2", "llm"]


# -- queries and expiry ------------------------------------------------------------------


def test_tag_queries(store: SqliteStore, keys: list[PublicIdentity]) -> None:
    for address, key in [(A3, keys[2]), (A1, keys[0]), (A2, keys[1])]:
        store.claim(address, key)
    store.put(rec(A3, keys[2], tags=("gpu",)))
    store.put(rec(A1, keys[0], tags=("gpu", "a100")))
    store.put(rec(A2, keys[1], tags=("cpu",), last_seen=500.0))  # expired at 1000
    assert [r.address for r in store.by_tag("gpu", 1000.0)] == [A1, A3]
    assert [r.tags for r in store.by_tag("gpu", 1000.0)] == [("a100", "gpu"), ("gpu",)]
    assert store.by_tag("cpu", 1000.0) == []
    assert [r.address for r in store.by_tag("cpu", 550.0)] == [A2]
    assert store.by_tag("nothing", 1000.0) == []
    assert [r.address for r in store.all(550.0)] == [A1, A2, A3]


def test_expiry_by_ttl(store: SqliteStore, keys: list[PublicIdentity]) -> None:
    store.claim(A1, keys[0])
    store.claim(A2, keys[1])
    store.put(rec(A1, keys[0], last_seen=100.0, tags=("x",)))
    store.put(rec(A2, keys[1], last_seen=150.0))
    assert store.get(A1, 100.0 + TTL - 0.001) is not None
    assert store.get(A1, 100.0 + TTL) is None
    assert store.expire(100.0 + TTL - 0.001) == 0
    assert store.expire(100.0 + TTL) == 1
    assert store.expire(100.0 + TTL) == 0
    assert [r.address for r in store.all(150.0)] == [A2]
    assert store.by_tag("x", 0.0) == []  # its tags went with it
    assert store.expire(10_000.0) == 1
    assert store.all(0.0) == []


def test_remove_keeps_the_claim(store: SqliteStore, keys: list[PublicIdentity]) -> None:
    store.claim(A1, keys[0])
    store.put(rec(A1, keys[0], tags=("gpu",), hostname="llm"))
    store.remove(A1)
    store.remove(A1)  # absent: a no-op
    assert store.get(A1, 1000.0) is None
    assert store.by_tag("gpu", 1000.0) == []
    assert store.by_hostname("llm", 1000.0) is None
    with pytest.raises(AddressTaken):
        store.claim(A1, keys[1])
    store.put(rec(A1, keys[0]))  # the claim still holds


# -- persistence and database errors -----------------------------------------------------


def test_persistence_across_reopen(tmp_path: Path, keys: list[PublicIdentity]) -> None:
    path = tmp_path / "registry.db"
    with SqliteStore(path, ttl=TTL) as s:
        s.claim(A1, keys[0])
        s.put(rec(A1, keys[0], tags=("gpu",), hostname="llm"))
    with SqliteStore(str(path), ttl=TTL) as s:
        assert s.get(A1, 1000.0) == rec(A1, keys[0], tags=("gpu",), hostname="llm")
        with pytest.raises(AddressTaken):
            s.claim(A1, keys[1])
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_corrupt_database_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(os.urandom(16) + b"this is not an sqlite database" * 200)
    with pytest.raises(StoreError, match=r"junk\.db") as ei:
        SqliteStore(path)
    assert "\n" not in str(ei.value)
    assert isinstance(ei.value, RegistryError)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        SqliteStore(path)


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE stuff (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="something else"):
        SqliteStore(path)


def test_unopenable_paths(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="missing"):
        SqliteStore(tmp_path / "missing" / "dir" / "registry.db")
    with pytest.raises(StoreError):
        SqliteStore(tmp_path)  # a directory
    with pytest.raises(StoreError):
        SqliteStore("bad\0path.db")


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="needs POSIX non-root")
def test_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(StoreError, match=r"registry\.db"):
            SqliteStore(ro / "registry.db")
    finally:
        ro.chmod(stat.S_IRWXU)


def test_corrupt_row_is_a_store_error(tmp_path: Path, keys: list[PublicIdentity]) -> None:
    path = tmp_path / "registry.db"
    with SqliteStore(path) as s:
        s.claim(A1, keys[0])
        s.put(rec(A1, keys[0]))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE records SET endpoint = 'garbage'")
    conn.commit()
    conn.close()
    with SqliteStore(path) as s, pytest.raises(StoreError, match="corrupt record"):
        s.get(A1, 1000.0)


def test_closed_store_raises_store_error(keys: list[PublicIdentity]) -> None:
    s = SqliteStore()
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.claim(A1, keys[0])


def test_bad_ttl() -> None:
    with pytest.raises(ValueError, match="ttl"):
        SqliteStore(ttl=0)
    with pytest.raises(ValueError, match="ttl"):
        SqliteStore(ttl=float("inf"))


# -- validators ----------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["a", "gpu", "a100", "x-y", "0", "a" * 32, "9-z"])
def test_valid_tags(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize(
    "tag", ["", "A", "Gpu", "-a", "a-", "a_b", "a.b", "a" * 33, "é", "a\n", " a", "\uff11"]
)
def test_bad_tags_name_the_value(tag: str) -> None:
    with pytest.raises(RegistryProtocolError, match="invalid tag") as ei:
        validate_tag(tag)
    assert repr(tag) in str(ei.value)
    assert "\n" not in str(ei.value)
    assert ei.value.code == "bad_request"


@pytest.mark.parametrize("tag", [None, 5, b"gpu", ["gpu"], True])
def test_bad_tag_types(tag: object) -> None:
    with pytest.raises(RegistryProtocolError, match="invalid tag"):
        validate_tag(tag)


def test_validate_tags() -> None:
    assert validate_tags(["gpu", "a100", "gpu"]) == ("a100", "gpu")
    assert validate_tags(()) == ()
    with pytest.raises(RegistryProtocolError, match="too many tags: 17"):
        validate_tags([f"t{i}" for i in range(17)])
    assert len(validate_tags([f"t{i}" for i in range(3)], max_tags=3)) == 3
    with pytest.raises(RegistryProtocolError, match="'Nope'"):
        validate_tags(["ok", "Nope"])
    for bad in ["gpu", None, {"gpu": 1}, 3]:
        with pytest.raises(RegistryProtocolError, match="'tags': expected a list"):
            validate_tags(bad)


@pytest.mark.parametrize(
    "name", [None, "llm", "llm.internal", "a", "x-1.y-2", "a" * 63, ".".join(["a" * 63] * 3)]
)
def test_valid_hostnames(name: str | None) -> None:
    assert validate_hostname(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "lowercase DNS name"),
        ("LLM", "lowercase DNS name"),
        ("llm.", "lowercase DNS name"),
        (".llm", "lowercase DNS name"),
        ("a..b", "lowercase DNS name"),
        ("a" * 64, "lowercase DNS name"),
        ("-a.b", "lowercase DNS name"),
        ("a_b", "lowercase DNS name"),
        ("ü.example", "lowercase DNS name"),
        (".".join(["a" * 63] * 4), "longer than 253"),
        ("tag", "reserved"),
        ("gpu.tag", "reserved"),
        ("llm.overlay", "must not end with '.overlay'"),
        ("1-0001-0000-0001", "overlay address"),
        ("65535-ffff-abcd-0000", "overlay address"),
    ],
)
def test_bad_hostnames_name_the_value(name: str, why: str) -> None:
    with pytest.raises(RegistryProtocolError, match=why) as ei:
        validate_hostname(name)
    shown = name if len(name) <= 40 else name[:37]
    assert shown in str(ei.value)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("name", [5, b"llm", ["llm"], True])
def test_bad_hostname_types(name: object) -> None:
    with pytest.raises(RegistryProtocolError, match="invalid hostname"):
        validate_hostname(name)


# -- endpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ep", "text"),
    [
        (("1.2.3.4", 5), "1.2.3.4:5"),
        (("::1", 65535), "[::1]:65535"),
        (("2001:db8::7", 4000), "[2001:db8::7]:4000"),
    ],
)
def test_endpoint_round_trip(ep: tuple[str, int], text: str) -> None:
    assert format_endpoint(ep) == text
    assert parse_endpoint_text(text) == ep


def test_endpoint_host_is_canonicalised() -> None:
    assert parse_endpoint_text("[2001:DB8:0::0001]:7") == ("2001:db8::1", 7)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1.2.3.4",
        "1.2.3.4:",
        "1.2.3.4:0",
        "1.2.3.4:65536",
        "1.2.3.4:-1",
        "1.2.3.4:+5",
        "1.2.3.4: 5",
        "1.2.3.4:5 ",
        "1.2.3.4:٣",
        "example.com:80",
        "localhost:80",
        "::1:80",
        "[::1]",
        "[::1]80",
        "[1.2.3.4]:80",
        "[fe80::1%eth0]:80",
        "[::1]:99999999999999999999",
        "01.2.3.4:5",
        "256.0.0.1:5",
        ":5",
        "[]:5",
    ],
)
def test_bad_endpoint_text(text: str) -> None:
    with pytest.raises(RegistryProtocolError, match="'endpoint'") as ei:
        parse_endpoint_text(text)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("value", [None, 5, ("1.2.3.4", 5), b"1.2.3.4:5"])
def test_bad_endpoint_types(value: object) -> None:
    with pytest.raises(RegistryProtocolError, match="'endpoint'"):
        parse_endpoint_text(value)


# -- NodeRecord JSON ------------------------------------------------------------------------------


def test_record_json_round_trip(keys: list[PublicIdentity]) -> None:
    r = NodeRecord(
        Address.parse("1:0001.0001.0001"),
        keys[0],
        ("203.0.113.5", 4000),
        (("10.0.0.2", 4000), ("fd00::2", 4001)),
        ("a100", "gpu"),
        "llm",
        1.5,
    )
    obj = r.to_json()
    assert obj == {
        "address": "1:0001.0001.0001",
        "identity": str(keys[0]),
        "endpoint": "203.0.113.5:4000",
        "local_endpoints": ["10.0.0.2:4000", "[fd00::2]:4001"],
        "tags": ["a100", "gpu"],
        "hostname": "llm",
        "last_seen": 1.5,
    }
    assert NodeRecord.from_json(json.loads(json.dumps(obj))) == r
    no_name = NodeRecord(r.address, r.identity, r.endpoint, (), (), None, 2.0)
    assert NodeRecord.from_json(no_name.to_json()) == no_name


def test_record_from_json_normalises_and_tolerates_extra_keys(keys: list[PublicIdentity]) -> None:
    obj = rec(A1, keys[0], tags=("b", "a")).to_json()
    obj["tags"] = ["b", "a", "b"]
    obj["last_seen"] = 7
    obj["future_field"] = {"x": 1}
    del obj["hostname"]
    got = NodeRecord.from_json(obj)
    assert got.tags == ("a", "b")
    assert got.last_seen == 7.0
    assert isinstance(got.last_seen, float)
    assert got.hostname is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("address", "1:0002.0000.0001"),
        ("address", 5),
        ("address", None),
        ("identity", "ovid1_nope"),
        ("identity", "ovid1_ü"),
        ("identity", 17),
        ("endpoint", "nowhere"),
        ("endpoint", ["1.2.3.4", 5]),
        ("local_endpoints", "10.0.0.1:5"),
        ("local_endpoints", ["10.0.0.1:5"] * 9),
        ("local_endpoints", [5]),
        ("tags", ["UPPER"]),
        ("tags", "gpu"),
        ("hostname", "x.overlay"),
        ("hostname", 3),
        ("last_seen", "1.5"),
        ("last_seen", True),
        ("last_seen", float("inf")),
        ("last_seen", None),
    ],
)
def test_record_from_json_bad_field(keys: list[PublicIdentity], field: str, value: object) -> None:
    obj = rec(A1, keys[0]).to_json()
    obj[field] = value
    with pytest.raises(RegistryProtocolError) as ei:
        NodeRecord.from_json(obj)
    message = str(ei.value)
    assert "\n" not in message
    assert field in message or "tag" in message or "hostname" in message


@pytest.mark.parametrize(
    "field", ["address", "identity", "endpoint", "local_endpoints", "tags", "last_seen"]
)
def test_record_from_json_missing_field(keys: list[PublicIdentity], field: str) -> None:
    obj = rec(A1, keys[0]).to_json()
    del obj[field]
    with pytest.raises(RegistryProtocolError, match=f"'{field}': missing"):
        NodeRecord.from_json(obj)


@pytest.mark.parametrize("garbage", [None, 1, "x", [], [1, 2], b"{}", {}, {"address": []}])
def test_record_from_json_garbage(garbage: object) -> None:
    with pytest.raises(RegistryProtocolError):
        NodeRecord.from_json(garbage)
