"""Datagram layouts: handshake messages, encrypted data packets, relay and discovery helpers.

Every datagram starts with a one-byte type. Handshake messages end with two
16-byte MACs (``mac1`` proves the sender knows the receiver's static public
key, so junk is dropped before any Diffie-Hellman work; ``mac2`` is reserved
for cookies under load and is zero). Data packets carry the receiver's session
index and a 64-bit counter in the clear; both are authenticated as AEAD
associated data. See docs/PROTOCOL.md for the byte-level picture.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Final

from .._address import Address
from .._exceptions import FrameError
from ._frames import decode_varint, encode_varint

__all__ = [
    "BIND_LABEL",
    "DATA_HEADER_SIZE",
    "INIT_SIZE_MIN",
    "MAC_SIZE",
    "RELAY_HOST",
    "RESPONSE_SIZE_MIN",
    "TYPE_COOKIE",
    "TYPE_DATA",
    "TYPE_IDENTIFY",
    "TYPE_INIT",
    "TYPE_PUNCH",
    "TYPE_REFUSAL",
    "TYPE_RELAY",
    "TYPE_RESPONSE",
    "VERSION",
    "DataHeader",
    "HandshakeInit",
    "HandshakeResponse",
    "HelloPayload",
    "IdentifyAnswer",
    "TransportParameters",
    "compute_mac1",
    "compute_mac2",
    "identify_request",
    "is_relay_addr",
    "mac1_key",
    "punch_datagram",
    "relay_addr",
    "relay_unwrap",
    "relay_wrap",
]

VERSION: Final = 1
TYPE_INIT: Final = 0x01
TYPE_RESPONSE: Final = 0x02
TYPE_REFUSAL: Final = 0x03
TYPE_DATA: Final = 0x04
TYPE_RELAY: Final = 0x05
TYPE_IDENTIFY: Final = 0x06
TYPE_PUNCH: Final = 0x07
TYPE_COOKIE: Final = 0x08
MAC_SIZE: Final = 16
_LABEL_MAC1: Final = b"overlay_httpx mac1 v1"

# type(1) version(1) reserved(2) sender_index(4)
_INIT_HEAD: Final = struct.Struct("!BBHI")
# type(1) version(1) reserved(2) sender_index(4) receiver_index(4)
_RESP_HEAD: Final = struct.Struct("!BBHII")
# type(1) receiver_index(4) counter(8)
_DATA_HEAD: Final = struct.Struct("!BIQ")
DATA_HEADER_SIZE: Final = _DATA_HEAD.size

# Noise IK message 1 is e(32) + enc(s)(48) + enc(payload)(payload + 16).
_NOISE_MSG1_MIN: Final = 32 + 48 + 16
_NOISE_MSG2_MIN: Final = 32 + 16
INIT_SIZE_MIN: Final = _INIT_HEAD.size + _NOISE_MSG1_MIN + 2 * MAC_SIZE
RESPONSE_SIZE_MIN: Final = _RESP_HEAD.size + _NOISE_MSG2_MIN + 2 * MAC_SIZE


def mac1_key(static_public: bytes) -> bytes:
    """The key for ``mac1`` of messages sent *to* the owner of `static_public`."""
    return hashlib.blake2s(_LABEL_MAC1 + static_public).digest()


def compute_mac1(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=MAC_SIZE).digest()


def compute_mac2(cookie: bytes, data_before_mac2: bytes) -> bytes:
    """mac2 proves the sender received `cookie` at its source address (see COOKIE)."""
    return compute_mac1(cookie, data_before_mac2)


def _check_macs(data: bytes, key: bytes) -> bool:
    body_end = len(data) - 2 * MAC_SIZE
    expected = compute_mac1(key, data[:body_end])
    return hmac.compare_digest(expected, data[body_end : body_end + MAC_SIZE])


@dataclass(frozen=True, slots=True)
class HandshakeInit:
    sender_index: int
    noise: bytes

    def encode(self, receiver_mac1_key: bytes, cookie: bytes | None = None) -> bytes:
        """The datagram; with a `cookie` from the receiver, mac2 proves our source address."""
        body = _INIT_HEAD.pack(TYPE_INIT, VERSION, 0, self.sender_index) + self.noise
        body += compute_mac1(receiver_mac1_key, body)
        return body + (bytes(MAC_SIZE) if cookie is None else compute_mac2(cookie, body))

    @classmethod
    def decode(cls, data: bytes, own_mac1_key: bytes) -> HandshakeInit | None:
        """None when the datagram is not a valid-looking initiation for us (bad MAC included)."""
        if len(data) < INIT_SIZE_MIN or data[1] != VERSION or not _check_macs(data, own_mac1_key):
            return None
        _, _, _, sender = _INIT_HEAD.unpack_from(data)
        return cls(sender, data[_INIT_HEAD.size : len(data) - 2 * MAC_SIZE])


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    """A handshake answer; a `refusal` has the same layout and says the trust policy said no."""

    sender_index: int
    receiver_index: int
    noise: bytes
    refusal: bool = False

    def encode(self, receiver_mac1_key: bytes) -> bytes:
        kind = TYPE_REFUSAL if self.refusal else TYPE_RESPONSE
        head = _RESP_HEAD.pack(kind, VERSION, 0, self.sender_index, self.receiver_index)
        body = head + self.noise
        return body + compute_mac1(receiver_mac1_key, body) + bytes(MAC_SIZE)

    @classmethod
    def decode(cls, data: bytes, own_mac1_key: bytes) -> HandshakeResponse | None:
        if (
            len(data) < RESPONSE_SIZE_MIN
            or data[1] != VERSION
            or not _check_macs(data, own_mac1_key)
        ):
            return None
        kind, _, _, sender, receiver = _RESP_HEAD.unpack_from(data)
        noise = data[_RESP_HEAD.size : len(data) - 2 * MAC_SIZE]
        return cls(sender, receiver, noise, refusal=kind == TYPE_REFUSAL)


class DataHeader:
    """Pack and unpack the 13-byte clear header of a data packet."""

    size: Final = DATA_HEADER_SIZE

    @staticmethod
    def pack(receiver_index: int, counter: int) -> bytes:
        return _DATA_HEAD.pack(TYPE_DATA, receiver_index, counter)

    @staticmethod
    def unpack(data: bytes) -> tuple[int, int] | None:
        """(receiver_index, counter), or None if too short to hold a header and a tag."""
        if len(data) < DATA_HEADER_SIZE + 16:
            return None
        _, index, counter = _DATA_HEAD.unpack_from(data)
        return index, counter


@dataclass(frozen=True, slots=True)
class TransportParameters:
    """Limits each side announces in its handshake payload."""

    max_streams: int = 1024
    initial_max_data: int = 1 << 20
    initial_max_stream_data: int = 256 << 10
    max_datagram_size: int = 1200
    idle_timeout_ms: int = 120_000

    def encode(self, out: bytearray) -> None:
        for value in (
            self.max_streams,
            self.initial_max_data,
            self.initial_max_stream_data,
            self.max_datagram_size,
            self.idle_timeout_ms,
        ):
            encode_varint(value, out)

    @classmethod
    def decode(cls, data: bytes, pos: int) -> tuple[TransportParameters, int]:
        values = []
        for _ in range(5):
            value, pos = decode_varint(data, pos)
            values.append(value)
        params = cls(*values)
        if params.max_datagram_size < 1200:
            raise FrameError(f"transport parameters: max_datagram_size {values[3]} below 1200")
        return params, pos


_HELLO_FIXED: Final = struct.Struct("!6s32s64sQQ")


@dataclass(frozen=True, slots=True)
class HelloPayload:
    """What each side proves inside its (encrypted) handshake message.

    The Noise handshake authenticates the X25519 static key; `signature` is
    the Ed25519 key's signature over that X25519 key, binding the two halves
    of the sender's `PublicIdentity` together. `timestamp` (nanoseconds,
    strictly increasing per initiator key) stops replayed initiations; the
    responder sends 0. `boot_id` changes whenever the sender's tunnel state is
    new, which is how a peer restart is told apart from a rekey.
    """

    address: Address
    ed25519: bytes
    signature: bytes
    timestamp: int
    boot_id: int
    params: TransportParameters

    def encode(self) -> bytes:
        out = bytearray(
            _HELLO_FIXED.pack(
                self.address.to_bytes(), self.ed25519, self.signature, self.timestamp, self.boot_id
            )
        )
        self.params.encode(out)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> HelloPayload:
        if len(data) < _HELLO_FIXED.size:
            raise FrameError("handshake payload truncated")
        address, ed25519, signature, timestamp, boot_id = _HELLO_FIXED.unpack_from(data)
        params, pos = TransportParameters.decode(data, _HELLO_FIXED.size)
        if pos != len(data):
            raise FrameError("handshake payload has trailing bytes")
        return cls(Address.from_bytes(address), ed25519, signature, timestamp, boot_id, params)


BIND_LABEL: Final = b"overlay_httpx bind v1:"


# -- relay -------------------------------------------------------------------------------

RELAY_HOST: Final = "relay"
"""The host part of the virtual UDP address of a peer reached through the relay."""
_RELAY_HEAD: Final = struct.Struct("!B6s")
RELAY_OVERHEAD: Final = _RELAY_HEAD.size


def relay_addr(address: Address) -> tuple[str, int]:
    """The virtual address a tunnel uses for a peer it reaches through the relay."""
    return (RELAY_HOST, int(address))


def is_relay_addr(addr: tuple[str, int]) -> bool:
    return addr[0] == RELAY_HOST


def relay_wrap(address: Address, inner: bytes) -> bytes:
    """A datagram for the relay: `address` is the destination (to the relay) or source (from it)."""
    return _RELAY_HEAD.pack(TYPE_RELAY, address.to_bytes()) + inner


def relay_unwrap(data: bytes) -> tuple[Address, bytes] | None:
    """(address, inner datagram), or None when too short or the address is reserved."""
    if len(data) < _RELAY_HEAD.size + 1:
        return None
    _, raw = _RELAY_HEAD.unpack_from(data)
    address = Address.from_bytes(raw)
    if address.is_unspecified or address.is_broadcast:
        return None
    return address, data[_RELAY_HEAD.size :]


# -- identify and punch -----------------------------------------------------------------

_IDENTIFY_HEAD: Final = struct.Struct("!BB8s")
_IDENTIFY_BODY: Final = struct.Struct("!32s32s64s6s")
IDENTIFY_SIZE: Final = _IDENTIFY_HEAD.size + _IDENTIFY_BODY.size


def identify_request(nonce: bytes) -> bytes:
    """Ask a rendezvous for its public identity (padded: an answer is never larger)."""
    if len(nonce) != 8:
        raise ValueError("identify nonce must be 8 bytes")
    head = _IDENTIFY_HEAD.pack(TYPE_IDENTIFY, 0, nonce)
    return head + bytes(IDENTIFY_SIZE - len(head))


@dataclass(frozen=True, slots=True)
class IdentifyAnswer:
    """A rendezvous's public keys, the signature binding them, and its overlay address.

    Unauthenticated on purpose (trust on first use); the Noise handshake that
    follows proves the X25519 key, and the binding signature ties the Ed25519
    key to it.
    """

    nonce: bytes
    x25519: bytes
    ed25519: bytes
    binding: bytes
    address: Address

    def encode(self) -> bytes:
        return _IDENTIFY_HEAD.pack(TYPE_IDENTIFY, 1, self.nonce) + _IDENTIFY_BODY.pack(
            self.x25519, self.ed25519, self.binding, self.address.to_bytes()
        )

    @classmethod
    def decode(cls, data: bytes) -> IdentifyAnswer | None:
        if len(data) != IDENTIFY_SIZE or data[0] != TYPE_IDENTIFY or data[1] != 1:
            return None
        _, _, nonce = _IDENTIFY_HEAD.unpack_from(data)
        x, ed, binding, raw = _IDENTIFY_BODY.unpack_from(data, _IDENTIFY_HEAD.size)
        return cls(nonce, x, ed, binding, Address.from_bytes(raw))

    @staticmethod
    def nonce_of_request(data: bytes) -> bytes | None:
        if len(data) != IDENTIFY_SIZE or data[1] != 0:
            return None
        return bytes(data[2:10])


def punch_datagram() -> bytes:
    """A datagram that only opens our NAT towards a peer; receivers drop it."""
    return bytes([TYPE_PUNCH]) + bytes(7)
