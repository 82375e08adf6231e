"""The Noise Protocol Framework, revision 34, on `cryptography` primitives.

Objects follow the specification's names (`CipherState`, `SymmetricState`,
`HandshakeState`) so the code can be read beside it. Supported: DH 25519;
ciphers AESGCM and ChaChaPoly; hashes SHA256, SHA512, BLAKE2s and BLAKE2b; the
fundamental interactive and one-way patterns (IK, XX, NK, KK, ...) with the
``pskN`` modifiers. Tests inject ephemeral keys to replay published vectors.

Beyond the specification, `CipherState` offers ``*_with_nonce`` methods for
transports that put the counter on the wire and accept messages out of order
(spec section 11.4); the tunnel uses those.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from ._exceptions import NoiseDecryptError, NoiseStateError

__all__ = [
    "DHLEN",
    "MAX_MESSAGE_LEN",
    "MAX_NONCE",
    "TAG_LEN",
    "CipherState",
    "HandshakePattern",
    "HandshakeState",
    "KeyPair",
    "NoiseProtocol",
    "SymmetricState",
    "pattern",
]

DHLEN: Final = 32
TAG_LEN: Final = 16
MAX_MESSAGE_LEN: Final = 65535
MAX_NONCE: Final = 2**64 - 1  # reserved by the spec: never used to encrypt
_KEY_LEN: Final = 32


# -- primitives ----------------------------------------------------------------


class KeyPair:
    """An X25519 key pair with its raw public bytes at hand."""

    __slots__ = ("private", "public")

    def __init__(self, private: X25519PrivateKey) -> None:
        self.private = private
        self.public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> KeyPair:
        return cls(X25519PrivateKey.from_private_bytes(data))

    def private_bytes(self) -> bytes:
        return self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def dh(self, public: bytes) -> bytes:
        """X25519 with `public`; a low-order point is a remote protocol error."""
        try:
            return self.private.exchange(X25519PublicKey.from_public_bytes(public))
        except ValueError:
            raise NoiseDecryptError("Noise: invalid or low-order DH public key") from None

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.hex()})"


class _AEAD(Protocol):
    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...
    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


@dataclass(frozen=True)
class _Cipher:
    name: str
    factory: Callable[[bytes], _AEAD]
    nonce: Callable[[int], bytes]


def _aesgcm_nonce(n: int) -> bytes:
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "big")


def _chachapoly_nonce(n: int) -> bytes:
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


_CIPHERS: Final = {
    "AESGCM": _Cipher("AESGCM", AESGCM, _aesgcm_nonce),
    "ChaChaPoly": _Cipher("ChaChaPoly", ChaCha20Poly1305, _chachapoly_nonce),
}


@dataclass(frozen=True)
class _Hash:
    name: str
    hashlib_name: str
    hashlen: int

    def digest(self, data: bytes) -> bytes:
        return hashlib.new(self.hashlib_name, data).digest()

    def hmac(self, key: bytes, data: bytes) -> bytes:
        return hmac.digest(key, data, self.hashlib_name)

    def hkdf(self, chaining_key: bytes, ikm: bytes, outputs: int) -> tuple[bytes, ...]:
        temp_key = self.hmac(chaining_key, ikm)
        out1 = self.hmac(temp_key, b"\x01")
        out2 = self.hmac(temp_key, out1 + b"\x02")
        if outputs == 2:
            return out1, out2
        return out1, out2, self.hmac(temp_key, out2 + b"\x03")


_HASHES: Final = {
    "SHA256": _Hash("SHA256", "sha256", 32),
    "SHA512": _Hash("SHA512", "sha512", 64),
    "BLAKE2s": _Hash("BLAKE2s", "blake2s", 32),
    "BLAKE2b": _Hash("BLAKE2b", "blake2b", 64),
}


# -- patterns ------------------------------------------------------------------


@dataclass(frozen=True)
class HandshakePattern:
    """A handshake pattern: pre-messages and message token lists, modifiers applied."""

    name: str
    initiator_pre: tuple[str, ...]
    responder_pre: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]

    @property
    def has_psk(self) -> bool:
        return any("psk" in m for m in self.messages)


# (initiator pre-message, responder pre-message, messages); "->" first, alternating.
_BASE_PATTERNS: Final[dict[str, tuple[str, str, tuple[str, ...]]]] = {
    "N": ("", "s", ("e, es",)),
    "K": ("s", "s", ("e, es, ss",)),
    "X": ("", "s", ("e, es, s, ss",)),
    "NN": ("", "", ("e", "e, ee")),
    "NK": ("", "s", ("e, es", "e, ee")),
    "NX": ("", "", ("e", "e, ee, s, es")),
    "KN": ("s", "", ("e", "e, ee, se")),
    "KK": ("s", "s", ("e, es, ss", "e, ee, se")),
    "KX": ("s", "", ("e", "e, ee, se, s, es")),
    "XN": ("", "", ("e", "e, ee", "s, se")),
    "XK": ("", "s", ("e, es", "e, ee", "s, se")),
    "XX": ("", "", ("e", "e, ee, s, es", "s, se")),
    "IN": ("", "", ("e, s", "e, ee, se")),
    "IK": ("", "s", ("e, es, s, ss", "e, ee, se")),
    "IX": ("", "", ("e, s", "e, ee, se, s, es")),
}

_PATTERN_RE: Final = re.compile(r"([A-Z]{1,2})((?:psk[0-9])(?:\+psk[0-9])*)?")


def _tokens(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def pattern(name: str) -> HandshakePattern:
    """Look up a pattern by name, e.g. ``"IK"`` or ``"IKpsk2"``."""
    m = _PATTERN_RE.fullmatch(name)
    if m is None or m.group(1) not in _BASE_PATTERNS:
        raise ValueError(f"unsupported Noise handshake pattern {name!r}")
    pre_i, pre_r, raw_messages = _BASE_PATTERNS[m.group(1)]
    messages = [list(_tokens(msg)) for msg in raw_messages]
    if m.group(2):
        for modifier in m.group(2).split("+"):
            n = int(modifier[3:])
            if n == 0:
                messages[0].insert(0, "psk")
            elif n <= len(messages):
                messages[n - 1].append("psk")
            else:
                raise ValueError(f"Noise pattern {name!r}: {modifier} names a missing message")
    return HandshakePattern(
        name=name,
        initiator_pre=_tokens(pre_i),
        responder_pre=_tokens(pre_r),
        messages=tuple(tuple(msg) for msg in messages),
    )


@dataclass(frozen=True)
class NoiseProtocol:
    """A parsed protocol name such as ``Noise_IK_25519_AESGCM_SHA256``."""

    name: str
    pattern: HandshakePattern
    cipher: _Cipher
    hash: _Hash

    @classmethod
    def parse(cls, name: str) -> NoiseProtocol:
        parts = name.split("_")
        if len(parts) != 5 or parts[0] != "Noise":
            raise ValueError(
                f"invalid Noise protocol name {name!r}: expected Noise_PATTERN_DH_CIPHER_HASH"
            )
        _, pat, dh, cipher, hash_name = parts
        if dh != "25519":
            raise ValueError(f"Noise protocol {name!r}: only DH 25519 is supported")
        if cipher not in _CIPHERS:
            raise ValueError(f"Noise protocol {name!r}: cipher must be one of {sorted(_CIPHERS)}")
        if hash_name not in _HASHES:
            raise ValueError(f"Noise protocol {name!r}: hash must be one of {sorted(_HASHES)}")
        return cls(name, pattern(pat), _CIPHERS[cipher], _HASHES[hash_name])


# -- states --------------------------------------------------------------------


class CipherState:
    """A key and a nonce counter (spec section 5.1)."""

    __slots__ = ("_aead", "_cipher", "_k", "n")

    def __init__(self, cipher: _Cipher, key: bytes | None = None) -> None:
        self._cipher = cipher
        self._k: bytes | None = None
        self._aead: _AEAD | None = None
        self.n = 0
        self.initialize_key(key)

    def initialize_key(self, key: bytes | None) -> None:
        self._k = key
        self._aead = self._cipher.factory(key) if key is not None else None
        self.n = 0

    def has_key(self) -> bool:
        return self._k is not None

    @property
    def key(self) -> bytes | None:
        return self._k

    def set_nonce(self, nonce: int) -> None:
        self.n = nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        if self.n >= MAX_NONCE:
            raise NoiseStateError("Noise: nonce space exhausted; rekey with a new handshake")
        out = self._aead.encrypt(self._cipher.nonce(self.n), plaintext, ad)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return ciphertext
        if self.n >= MAX_NONCE:
            raise NoiseStateError("Noise: nonce space exhausted; rekey with a new handshake")
        out = self.decrypt_with_nonce(self.n, ad, ciphertext)
        self.n += 1
        return out

    def encrypt_with_nonce(self, nonce: int, ad: bytes, plaintext: bytes) -> bytes:
        """Encrypt under an explicit nonce; the caller guarantees it is never reused."""
        if self._aead is None:
            raise NoiseStateError("Noise: cipher state has no key")
        if not 0 <= nonce < MAX_NONCE:
            raise NoiseStateError(f"Noise: nonce {nonce} out of range")
        return self._aead.encrypt(self._cipher.nonce(nonce), plaintext, ad)

    def decrypt_with_nonce(self, nonce: int, ad: bytes, ciphertext: bytes) -> bytes:
        """Decrypt under an explicit nonce; raises `NoiseDecryptError` on any forgery."""
        if self._aead is None:
            raise NoiseStateError("Noise: cipher state has no key")
        if not 0 <= nonce < MAX_NONCE or len(ciphertext) < TAG_LEN:
            raise NoiseDecryptError("Noise: message failed authentication")
        try:
            return self._aead.decrypt(self._cipher.nonce(nonce), ciphertext, ad)
        except InvalidTag:
            raise NoiseDecryptError("Noise: message failed authentication") from None

    def rekey(self) -> None:
        """Replace the key by a one-way function of itself (spec section 4.2)."""
        if self._aead is None:
            raise NoiseStateError("Noise: cipher state has no key")
        new = self._aead.encrypt(self._cipher.nonce(MAX_NONCE), bytes(_KEY_LEN), b"")[:_KEY_LEN]
        n = self.n
        self.initialize_key(new)
        self.n = n

    def __repr__(self) -> str:
        return f"CipherState({self._cipher.name}, keyed={self.has_key()}, n={self.n})"


class SymmetricState:
    """The chaining key and handshake hash (spec section 5.2)."""

    def __init__(self, protocol: NoiseProtocol) -> None:
        self._hash = protocol.hash
        self._cipher = protocol.cipher
        name = protocol.name.encode("ascii")
        hashlen = self._hash.hashlen
        self.h = name.ljust(hashlen, b"\x00") if len(name) <= hashlen else self._hash.digest(name)
        self.ck = self.h
        self.cipher_state = CipherState(self._cipher)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = self._hash.hkdf(self.ck, ikm, 2)
        self.cipher_state.initialize_key(temp_k[:_KEY_LEN])

    def mix_hash(self, data: bytes) -> None:
        self.h = self._hash.digest(self.h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = self._hash.hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher_state.initialize_key(temp_k[:_KEY_LEN])

    def get_handshake_hash(self) -> bytes:
        return self.h

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher_state.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher_state.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = self._hash.hkdf(self.ck, b"", 2)
        return (
            CipherState(self._cipher, temp_k1[:_KEY_LEN]),
            CipherState(self._cipher, temp_k2[:_KEY_LEN]),
        )


def _as_keypair(key: KeyPair | X25519PrivateKey | bytes | None) -> KeyPair | None:
    if key is None or isinstance(key, KeyPair):
        return key
    if isinstance(key, X25519PrivateKey):
        return KeyPair(key)
    return KeyPair.from_private_bytes(key)


class HandshakeState:
    """One side of a Noise handshake (spec section 5.3).

    Call `write_message` and `read_message` in the order the pattern gives;
    when `handshake_complete` is true, `send_cipher` / `receive_cipher` carry
    transport messages. ``e`` injects the ephemeral key (tests only).
    """

    def __init__(
        self,
        protocol: NoiseProtocol | str,
        *,
        initiator: bool,
        prologue: bytes = b"",
        s: KeyPair | X25519PrivateKey | bytes | None = None,
        e: KeyPair | X25519PrivateKey | bytes | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
    ) -> None:
        self.protocol = (
            protocol if isinstance(protocol, NoiseProtocol) else NoiseProtocol.parse(protocol)
        )
        pat = self.protocol.pattern
        self.initiator = initiator
        self.s = _as_keypair(s)
        self.e = _as_keypair(e)
        self.rs = rs
        self.re = re
        self._psks = list(psks)
        for psk in self._psks:
            if len(psk) != 32:
                raise ValueError("Noise: a pre-shared key must be 32 bytes")
        needed_psks = sum(m.count("psk") for m in pat.messages)
        if len(self._psks) != needed_psks:
            raise ValueError(
                f"Noise pattern {pat.name} needs {needed_psks} PSK(s), got {len(self._psks)}"
            )
        self._symmetric = SymmetricState(self.protocol)
        self._symmetric.mix_hash(prologue)
        self._message_index = 0
        self._ciphers: tuple[CipherState, CipherState] | None = None

        for owner_is_initiator, tokens in ((True, pat.initiator_pre), (False, pat.responder_pre)):
            mine = owner_is_initiator == initiator
            for token in tokens:
                if token == "s":
                    key = (self.s.public if self.s else None) if mine else self.rs
                elif token == "e":
                    key = (self.e.public if self.e else None) if mine else self.re
                else:  # pragma: no cover - table is static
                    raise ValueError(f"bad pre-message token {token!r}")
                if key is None:
                    who = "local" if mine else "remote"
                    raise ValueError(
                        f"Noise pattern {pat.name} needs the {who} {token!r} key up front"
                    )
                self._symmetric.mix_hash(key)

    # -- state queries ----------------------------------------------------------

    @property
    def handshake_complete(self) -> bool:
        return self._ciphers is not None

    @property
    def is_my_turn(self) -> bool:
        """True when the next handshake message is ours to write."""
        return (self._message_index % 2 == 0) == self.initiator

    @property
    def handshake_hash(self) -> bytes:
        return self._symmetric.get_handshake_hash()

    @property
    def remote_static(self) -> bytes | None:
        return self.rs

    @property
    def send_cipher(self) -> CipherState:
        return self._transport()[0 if self.initiator else 1]

    @property
    def receive_cipher(self) -> CipherState:
        return self._transport()[1 if self.initiator else 0]

    def _transport(self) -> tuple[CipherState, CipherState]:
        if self._ciphers is None:
            raise NoiseStateError("Noise: handshake not complete; no transport keys yet")
        return self._ciphers

    # -- messages ---------------------------------------------------------------

    def write_message(self, payload: bytes = b"") -> bytes:
        """Produce our next handshake message carrying `payload` (encrypted once keys exist)."""
        tokens = self._next_tokens(writing=True)
        sym = self._symmetric
        out = bytearray()
        for token in tokens:
            if token == "e":
                if self.e is None:
                    self.e = KeyPair.generate()
                out += self.e.public
                sym.mix_hash(self.e.public)
                if self.protocol.pattern.has_psk:
                    sym.mix_key(self.e.public)
            elif token == "s":
                if self.s is None:
                    raise NoiseStateError("Noise: pattern sends 's' but no static key was given")
                out += sym.encrypt_and_hash(self.s.public)
            elif token == "psk":
                sym.mix_key_and_hash(self._psks.pop(0))
            else:
                sym.mix_key(self._dh(token))
        out += sym.encrypt_and_hash(payload)
        if len(out) > MAX_MESSAGE_LEN:
            raise NoiseStateError(f"Noise: message of {len(out)} bytes exceeds {MAX_MESSAGE_LEN}")
        self._advance()
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Consume the peer's next handshake message and return its payload.

        Raises `NoiseDecryptError` for anything malformed or forged; the
        state is then unusable and should be discarded.
        """
        if len(message) > MAX_MESSAGE_LEN:
            raise NoiseDecryptError("Noise: message too long")
        tokens = self._next_tokens(writing=False)
        sym = self._symmetric
        view = memoryview(message)
        pos = 0
        for token in tokens:
            if token == "e":
                if len(view) - pos < DHLEN:
                    raise NoiseDecryptError("Noise: handshake message truncated")
                self.re = bytes(view[pos : pos + DHLEN])
                pos += DHLEN
                sym.mix_hash(self.re)
                if self.protocol.pattern.has_psk:
                    sym.mix_key(self.re)
            elif token == "s":
                size = DHLEN + (TAG_LEN if sym.cipher_state.has_key() else 0)
                if len(view) - pos < size:
                    raise NoiseDecryptError("Noise: handshake message truncated")
                self.rs = sym.decrypt_and_hash(bytes(view[pos : pos + size]))
                pos += size
            elif token == "psk":
                sym.mix_key_and_hash(self._psks.pop(0))
            else:
                sym.mix_key(self._dh(token))
        rest = bytes(view[pos:])
        if sym.cipher_state.has_key() and len(rest) < TAG_LEN:
            raise NoiseDecryptError("Noise: handshake message truncated")
        payload = sym.decrypt_and_hash(rest)
        self._advance()
        return payload

    def _next_tokens(self, *, writing: bool) -> tuple[str, ...]:
        messages = self.protocol.pattern.messages
        if self._message_index >= len(messages):
            raise NoiseStateError("Noise: handshake already complete")
        if writing != self.is_my_turn:
            verb = "write" if writing else "read"
            raise NoiseStateError(
                f"Noise: not our turn to {verb} handshake message {self._message_index + 1}"
            )
        return messages[self._message_index]

    def _advance(self) -> None:
        self._message_index += 1
        if self._message_index == len(self.protocol.pattern.messages):
            self._ciphers = self._symmetric.split()

    def _dh(self, token: str) -> bytes:
        # token is two letters: ours-then-theirs from the initiator's viewpoint.
        first, second = token[0], token[1]
        if not self.initiator:
            first, second = second, first
        local = self.e if first == "e" else self.s
        remote = self.re if second == "e" else self.rs
        if local is None or remote is None:
            raise NoiseStateError(f"Noise: token {token!r} needs a key that is missing")
        return local.dh(remote)
