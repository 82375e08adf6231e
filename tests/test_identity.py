from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from overlay_httpx import (
    Identity,
    IdentityCorrupt,
    IdentityExists,
    IdentityInsecure,
    IdentityNotFound,
    PublicIdentity,
)
from overlay_httpx._identity import KEY_SIZE


def _secret_hexes(identity: Identity, path: Path) -> list[str]:
    doc = json.loads(path.read_text())
    return [doc["x25519"], doc["ed25519"]]


def test_save_load_round_trip(tmp_path: Path) -> None:
    me = Identity.generate()
    path = tmp_path / "id.json"
    me.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Identity.load(path)
    assert again == me
    assert again.public == me.public
    assert [p.name for p in tmp_path.iterdir()] == ["id.json"]  # no temp file left behind


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    first, second = Identity.generate(), Identity.generate()
    first.save(path)
    with pytest.raises(IdentityExists, match="overwrite=True"):
        second.save(path)
    assert Identity.load(path) == first  # nothing lost
    second.save(path, overwrite=True)
    assert Identity.load(path) == second
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IdentityNotFound, match="does not exist") as info:
        Identity.load(tmp_path / "nope.json")
    assert isinstance(info.value, FileNotFoundError)
    assert "nope.json" in str(info.value)


def test_save_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(IdentityNotFound, match="no such directory"):
        Identity.generate().save(tmp_path / "missing" / "id.json")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_group_or_world_readable_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "id.json"
    Identity.generate().save(path)
    path.chmod(mode)
    with pytest.raises(IdentityInsecure, match="chmod 600") as info:
        Identity.load(path)
    assert isinstance(info.value, PermissionError)
    assert f"{mode:04o}" in str(info.value)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "corrupt"),
        (b"\xff\xfe garbage", "corrupt"),
        (b"[]", "corrupt"),
        (b'{"format": "something-else"}', "corrupt"),
        (b'{"format": "overlay_httpx-identity", "version": 9}', "version 9"),
        (
            b'{"format": "overlay_httpx-identity", "version": 1, "x25519": "zz", "ed25519": ""}',
            "x25519",
        ),
        (
            b'{"format": "overlay_httpx-identity", "version": 1, "x25519": "' + b"00" * 32 + b'"}',
            "ed25519",
        ),
    ],
)
def test_corrupt_files(tmp_path: Path, content: bytes, match: str) -> None:
    path = _write(tmp_path / "id.json", content)
    with pytest.raises(IdentityCorrupt, match=match) as info:
        Identity.load(path)
    assert "id.json" in str(info.value)


def test_public_mismatch_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    Identity.generate().save(path)
    doc = json.loads(path.read_text())
    doc["public"] = str(Identity.generate().public)
    _write(path, json.dumps(doc).encode())
    with pytest.raises(IdentityCorrupt, match="do not match"):
        Identity.load(path)


def test_directory_is_not_an_identity(tmp_path: Path) -> None:
    with pytest.raises(IdentityCorrupt, match="not a regular file"):
        Identity.load(tmp_path)


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "id.json"
    made = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(path) == made


def test_load_or_create_race_yields_one_identity(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    results: list[Identity] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(Identity.load_or_create(path))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    assert all(r == results[0] for r in results)
    assert Identity.load(path) == results[0]


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    me = Identity.generate()
    path = tmp_path / "id.json"
    me.save(path)
    text = repr(me) + str(me) + repr(me.public) + str(me.public)
    for secret in _secret_hexes(me, path):
        assert secret not in text
        assert secret not in text.lower()
    assert me.public.fingerprint in repr(me)


def test_public_text_round_trip_and_checks() -> None:
    pub = Identity.generate().public
    text = str(pub)
    assert text.startswith("ovid1_")
    assert PublicIdentity.parse(text) == pub
    assert PublicIdentity.parse(f"  {text}\n") == pub
    assert PublicIdentity.from_bytes(bytes(pub)) == pub
    assert hash(PublicIdentity.parse(text)) == hash(pub)
    assert len(pub.x25519) == len(pub.ed25519) == KEY_SIZE
    # a single-character typo is caught by the checksum or the decoder
    i = len("ovid1_") + 10
    typo = text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1 :]
    with pytest.raises(IdentityCorrupt):
        PublicIdentity.parse(typo)


@pytest.mark.parametrize(
    "text",
    ["", "ovid1_", "ovid2_" + "A" * 91, "ovid1_" + "!" * 91, "ovid1_" + "A" * 90, "nonsense"],
)
def test_public_text_garbage(text: str) -> None:
    with pytest.raises(IdentityCorrupt, match="public identity"):
        PublicIdentity.parse(text)


def test_fingerprint_shape_and_distinct() -> None:
    a, b = Identity.generate().public, Identity.generate().public
    parts = a.fingerprint.split(":")
    assert len(parts) == 4
    assert all(len(p) == 4 for p in parts)
    int("".join(parts), 16)
    assert a.fingerprint != b.fingerprint


def test_sign_and_verify() -> None:
    me, other = Identity.generate(), Identity.generate()
    sig = me.sign(b"record")
    assert me.public.verify(sig, b"record")
    assert not me.public.verify(sig, b"recorD")
    assert not other.public.verify(sig, b"record")


def test_bad_key_bytes() -> None:
    with pytest.raises(IdentityCorrupt, match="32 bytes"):
        PublicIdentity(b"x" * 31, b"y" * 32)
    with pytest.raises(IdentityCorrupt, match="64 bytes"):
        PublicIdentity.from_bytes(b"x" * 63)
    with pytest.raises(IdentityCorrupt, match="private key"):
        Identity.from_private_bytes(b"x" * 31, b"y" * 32)


def test_identity_is_not_hashable_public_is() -> None:
    me = Identity.generate()
    with pytest.raises(TypeError):
        hash(me)
    assert {me.public: 1}[me.public] == 1
