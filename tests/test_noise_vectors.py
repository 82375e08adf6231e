"""Every cacophony vector for IK, IKpsk2 and XX, with both ciphers and four hashes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from overlay_httpx._noise import HandshakeState

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "noise_cacophony_25519.json").read_text()
)["vectors"]


def _pair(v: dict[str, Any]) -> tuple[HandshakeState, HandshakeState]:
    def opt(key: str) -> bytes | None:
        return bytes.fromhex(v[key]) if key in v else None

    init = HandshakeState(
        v["protocol_name"],
        initiator=True,
        prologue=bytes.fromhex(v["init_prologue"]),
        s=opt("init_static"),
        e=opt("init_ephemeral"),
        rs=opt("init_remote_static"),
        psks=[bytes.fromhex(p) for p in v.get("init_psks", [])],
    )
    resp = HandshakeState(
        v["protocol_name"],
        initiator=False,
        prologue=bytes.fromhex(v["resp_prologue"]),
        s=opt("resp_static"),
        e=opt("resp_ephemeral"),
        rs=opt("resp_remote_static"),
        psks=[bytes.fromhex(p) for p in v.get("resp_psks", [])],
    )
    return init, resp


def test_all_24_protocols_present() -> None:
    names = {v["protocol_name"] for v in VECTORS}
    assert len(names) == 24
    for pat in ("IK", "IKpsk2", "XX"):
        for cipher in ("AESGCM", "ChaChaPoly"):
            for h in ("SHA256", "SHA512", "BLAKE2s", "BLAKE2b"):
                assert f"Noise_{pat}_25519_{cipher}_{h}" in names


@pytest.mark.parametrize("v", VECTORS, ids=[v["protocol_name"] for v in VECTORS])
def test_vector(v: dict[str, Any]) -> None:
    init, resp = _pair(v)
    handshake_len = len(init.protocol.pattern.messages)
    for i, msg in enumerate(v["messages"]):
        payload = bytes.fromhex(msg["payload"])
        expected = bytes.fromhex(msg["ciphertext"])
        sender_is_init = i % 2 == 0
        sender, receiver = (init, resp) if sender_is_init else (resp, init)
        if i < handshake_len:
            assert sender.is_my_turn
            assert not receiver.is_my_turn
            assert sender.write_message(payload) == expected, f"message {i}"
            assert receiver.read_message(expected) == payload, f"message {i}"
            if i == handshake_len - 1:
                assert init.handshake_complete
                assert resp.handshake_complete
                assert init.handshake_hash == resp.handshake_hash
                assert init.handshake_hash == bytes.fromhex(v["handshake_hash"])
        else:
            ct = sender.send_cipher.encrypt_with_ad(b"", payload)
            assert ct == expected, f"transport message {i}"
            assert receiver.receive_cipher.decrypt_with_ad(b"", ct) == payload
