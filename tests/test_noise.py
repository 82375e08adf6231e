"""Noise behaviour beyond the vectors: misuse, forgery, explicit nonces, patterns."""

from __future__ import annotations

import pytest
from _fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from overlay_httpx import NoiseDecryptError, NoiseStateError
from overlay_httpx._noise import (
    MAX_NONCE,
    CipherState,
    HandshakeState,
    KeyPair,
    NoiseProtocol,
    pattern,
)

IK = "Noise_IK_25519_AESGCM_SHA256"


def _ik_pair(psk: bytes | None = None) -> tuple[HandshakeState, HandshakeState, KeyPair, KeyPair]:
    i_s, r_s = KeyPair.generate(), KeyPair.generate()
    name = IK if psk is None else "Noise_IKpsk2_25519_AESGCM_SHA256"
    psks = [] if psk is None else [psk]
    init = HandshakeState(name, initiator=True, s=i_s, rs=r_s.public, psks=psks)
    resp = HandshakeState(name, initiator=False, s=r_s, psks=psks)
    return init, resp, i_s, r_s


def test_ik_round_trip_reveals_initiator_static() -> None:
    init, resp, i_s, _ = _ik_pair()
    m1 = init.write_message(b"hello")
    assert resp.read_message(m1) == b"hello"
    assert resp.remote_static == i_s.public
    m2 = resp.write_message(b"world")
    assert init.read_message(m2) == b"world"
    assert init.handshake_complete
    assert resp.handshake_complete
    ct = init.send_cipher.encrypt_with_ad(b"ad", b"data")
    assert resp.receive_cipher.decrypt_with_ad(b"ad", ct) == b"data"
    ct = resp.send_cipher.encrypt_with_ad(b"", b"back")
    assert init.receive_cipher.decrypt_with_ad(b"", ct) == b"back"


def test_initiator_static_is_never_in_clear() -> None:
    init, _, i_s, _ = _ik_pair()
    assert i_s.public not in init.write_message(b"")


def test_wrong_responder_key_fails_authentication() -> None:
    i_s, r_s, other = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    init = HandshakeState(IK, initiator=True, s=i_s, rs=other.public)
    resp = HandshakeState(IK, initiator=False, s=r_s)
    with pytest.raises(NoiseDecryptError):
        resp.read_message(init.write_message(b"x"))


def test_psk_mismatch_fails() -> None:
    i_s, r_s = KeyPair.generate(), KeyPair.generate()
    name = "Noise_IKpsk2_25519_AESGCM_SHA256"
    init = HandshakeState(name, initiator=True, s=i_s, rs=r_s.public, psks=[b"a" * 32])
    resp = HandshakeState(name, initiator=False, s=r_s, psks=[b"b" * 32])
    resp.read_message(init.write_message(b""))  # psk2 is mixed in at message 2
    with pytest.raises(NoiseDecryptError):
        init.read_message(resp.write_message(b""))


@pytest.mark.parametrize("index", range(0, 96, 7))
def test_any_flipped_bit_in_first_message_is_rejected(index: int) -> None:
    init, resp, _, _ = _ik_pair()
    m1 = bytearray(init.write_message(b"payload"))
    m1[index % len(m1)] ^= 0x01
    with pytest.raises(NoiseDecryptError):
        resp.read_message(bytes(m1))


@pytest.mark.fuzz
@fuzz_settings(100)
@given(st.binary(max_size=300))
def test_garbage_first_message_raises_only_decrypt_error(data: bytes) -> None:
    _, resp, _, _ = _ik_pair()
    with pytest.raises(NoiseDecryptError):
        resp.read_message(data)


def test_out_of_turn_and_after_completion_are_local_errors() -> None:
    init, resp, _, _ = _ik_pair()
    with pytest.raises(NoiseStateError, match="not our turn"):
        resp.write_message(b"")
    with pytest.raises(NoiseStateError, match="not complete"):
        _ = init.send_cipher
    resp.read_message(init.write_message(b""))
    with pytest.raises(NoiseStateError, match="not our turn"):
        init.write_message(b"")
    init.read_message(resp.write_message(b""))
    with pytest.raises(NoiseStateError, match="already complete"):
        init.write_message(b"")


def test_explicit_nonce_out_of_order_and_forgery() -> None:
    key = bytes(range(32))
    proto = NoiseProtocol.parse(IK)
    tx, rx = CipherState(proto.cipher, key), CipherState(proto.cipher, key)
    cts = {n: tx.encrypt_with_nonce(n, b"hdr", f"msg{n}".encode()) for n in (5, 1, 9)}
    for n in (9, 1, 5):
        assert rx.decrypt_with_nonce(n, b"hdr", cts[n]) == f"msg{n}".encode()
    with pytest.raises(NoiseDecryptError):
        rx.decrypt_with_nonce(2, b"hdr", cts[1])
    with pytest.raises(NoiseDecryptError):
        rx.decrypt_with_nonce(1, b"other", cts[1])
    with pytest.raises(NoiseDecryptError):
        rx.decrypt_with_nonce(1, b"hdr", b"short")
    with pytest.raises(NoiseStateError):
        tx.encrypt_with_nonce(MAX_NONCE, b"", b"")


def test_rekey_changes_key_and_keeps_both_sides_in_step() -> None:
    proto = NoiseProtocol.parse("Noise_XX_25519_ChaChaPoly_BLAKE2s")
    a, b = CipherState(proto.cipher, b"k" * 32), CipherState(proto.cipher, b"k" * 32)
    before = a.key
    a.rekey()
    b.rekey()
    assert a.key != before
    assert a.key == b.key
    assert b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"x")) == b"x"


def test_nonce_exhaustion_refuses_to_encrypt() -> None:
    proto = NoiseProtocol.parse(IK)
    c = CipherState(proto.cipher, b"k" * 32)
    c.set_nonce(MAX_NONCE)
    with pytest.raises(NoiseStateError, match="exhausted"):
        c.encrypt_with_ad(b"", b"x")


@pytest.mark.parametrize("name", ["NN", "NK", "KK", "XK", "IX", "NNpsk0", "XXpsk3", "N", "K", "X"])
def test_other_patterns_complete(name: str) -> None:
    pat = pattern(name)
    i_s, r_s = KeyPair.generate(), KeyPair.generate()
    psks = [b"p" * 32] * sum(m.count("psk") for m in pat.messages)
    proto = f"Noise_{name}_25519_AESGCM_SHA512"
    init = HandshakeState(proto, initiator=True, s=i_s, rs=r_s.public, psks=psks)
    resp = HandshakeState(proto, initiator=False, s=r_s, rs=i_s.public, psks=psks)
    for i in range(len(pat.messages)):
        a, b = (init, resp) if i % 2 == 0 else (resp, init)
        assert b.read_message(a.write_message(f"m{i}".encode())) == f"m{i}".encode()
    assert init.handshake_hash == resp.handshake_hash
    ct = init.send_cipher.encrypt_with_ad(b"", b"t")
    assert resp.receive_cipher.decrypt_with_ad(b"", ct) == b"t"


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("Noise_IK_448_AESGCM_SHA256", "25519"),
        ("Noise_IK_25519_AES_SHA256", "cipher"),
        ("Noise_IK_25519_AESGCM_MD5", "hash"),
        ("Noise_ZZ_25519_AESGCM_SHA256", "pattern"),
        ("Noise_NNpsk5_25519_AESGCM_SHA256", "psk5"),
        ("IK", "expected Noise_PATTERN"),
    ],
)
def test_bad_protocol_names(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NoiseProtocol.parse(name)


def test_missing_keys_and_psks_are_reported() -> None:
    with pytest.raises(ValueError, match="remote 's' key"):
        HandshakeState(IK, initiator=True, s=KeyPair.generate())
    with pytest.raises(ValueError, match="needs 1 PSK"):
        HandshakeState("Noise_IKpsk2_25519_AESGCM_SHA256", initiator=False, s=KeyPair.generate())


def test_low_order_point_is_rejected() -> None:
    r_s = KeyPair.generate()
    resp = HandshakeState("Noise_NN_25519_AESGCM_SHA256", initiator=False, s=r_s)
    resp.read_message(bytes(32))  # the all-zero point as the initiator's ephemeral
    with pytest.raises(NoiseDecryptError, match="low-order"):
        resp.write_message(b"")
