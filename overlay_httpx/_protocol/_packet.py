"""Datagram layouts: handshake initiation and response, and encrypted data packets.

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
    "RESPONSE_SIZE_MIN",
    "TYPE_DATA",
    "TYPE_INIT",
    "TYPE_RESPONSE",
    "VERSION",
    "DataHeader",
    "HandshakeInit",
    "HandshakeResponse",
    "HelloPayload",
    "TransportParameters",
    "compute_mac1",
    "mac1_key",
]

VERSION: Final = 1
TYPE_INIT: Final = 0x01
TYPE_RESPONSE: Final = 0x02
TYPE_DATA: Final = 0x04
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


def _check_macs(data: bytes, key: bytes) -> bool:
    body_end = len(data) - 2 * MAC_SIZE
    expected = compute_mac1(key, data[:body_end])
    return hmac.compare_digest(expected, data[body_end : body_end + MAC_SIZE])


@dataclass(frozen=True, slots=True)
class HandshakeInit:
    sender_index: int
    noise: bytes

    def encode(self, receiver_mac1_key: bytes) -> bytes:
        body = _INIT_HEAD.pack(TYPE_INIT, VERSION, 0, self.sender_index) + self.noise
        return body + compute_mac1(receiver_mac1_key, body) + bytes(MAC_SIZE)

    @classmethod
    def decode(cls, data: bytes, own_mac1_key: bytes) -> HandshakeInit | None:
        """None when the datagram is not a valid-looking initiation for us (bad MAC included)."""
        if len(data) < INIT_SIZE_MIN or data[1] != VERSION or not _check_macs(data, own_mac1_key):
            return None
        _, _, _, sender = _INIT_HEAD.unpack_from(data)
        return cls(sender, data[_INIT_HEAD.size : len(data) - 2 * MAC_SIZE])


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    sender_index: int
    receiver_index: int
    noise: bytes

    def encode(self, receiver_mac1_key: bytes) -> bytes:
        head = _RESP_HEAD.pack(TYPE_RESPONSE, VERSION, 0, self.sender_index, self.receiver_index)
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
        _, _, _, sender, receiver = _RESP_HEAD.unpack_from(data)
        return cls(sender, receiver, data[_RESP_HEAD.size : len(data) - 2 * MAC_SIZE])


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
