"""Key sessions of one tunnel: the Noise IK handshake and the AEAD records under it.

A tunnel outlives its sessions: a rekey makes a new session (new indexes, new
keys) while streams, packet numbers and loss recovery carry on. Packet
counters never restart, so a nonce is never reused under any key.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from .._address import Address
from .._exceptions import FrameError, NoiseDecryptError
from .._identity import Identity, PublicIdentity
from .._noise import CipherState, HandshakeState, KeyPair, NoiseProtocol
from ._packet import (
    BIND_LABEL,
    MAC_SIZE,
    DataHeader,
    HandshakeInit,
    HandshakeResponse,
    HelloPayload,
    TransportParameters,
    mac1_key,
)
from ._replay import ReplayWindow

__all__ = [
    "NOISE_PROTOCOL",
    "NOISE_PROTOCOL_PSK",
    "REFUSAL_LABEL",
    "AcceptedInitiation",
    "LocalKeys",
    "PendingInitiation",
    "Session",
    "accept_initiation",
    "bound_identity",
    "random_index",
    "verify_hello",
]

NOISE_PROTOCOL: Final = NoiseProtocol.parse("Noise_IK_25519_AESGCM_SHA256")
NOISE_PROTOCOL_PSK: Final = NoiseProtocol.parse("Noise_IKpsk2_25519_AESGCM_SHA256")
"""With a network key: only holders of the pre-shared key can complete a handshake."""
_PROLOGUE: Final = b"overlay_httpx v1"


def random_index() -> int:
    return int.from_bytes(os.urandom(4), "big")


@dataclass(frozen=True, slots=True)
class LocalKeys:
    """Everything about ourselves a handshake needs, computed once per endpoint."""

    identity: Identity
    address: Address
    static: KeyPair
    mac1_key: bytes  # for messages sent to us
    binding: bytes  # Ed25519 signature over our X25519 key
    psk: bytes | None = None  # the network key (Noise IKpsk2), when the network has one
    # The next handshake's ephemeral key, made by `prepare` while nothing waits for it.
    spare: list[KeyPair] = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def create(cls, identity: Identity, address: Address, psk: bytes | None = None) -> LocalKeys:
        if psk is not None and len(psk) != 32:
            raise ValueError(f"network key: expected 32 bytes, got {len(psk)}")
        static = KeyPair(identity.x25519_key)
        return cls(
            identity=identity,
            address=address,
            static=static,
            mac1_key=mac1_key(static.public),
            binding=identity.sign(BIND_LABEL + static.public),
            psk=psk,
        )

    def handshake(
        self,
        *,
        initiator: bool,
        remote_static: bytes | None = None,
        ephemeral: KeyPair | None = None,
    ) -> HandshakeState:
        """A fresh Noise handshake: IK, or IKpsk2 when there is a network key."""
        return HandshakeState(
            NOISE_PROTOCOL if self.psk is None else NOISE_PROTOCOL_PSK,
            initiator=initiator,
            prologue=_PROLOGUE,
            s=self.static,
            e=ephemeral,
            rs=remote_static,
            psks=() if self.psk is None else (self.psk,),
        )

    def ephemeral(self) -> KeyPair:
        """A new ephemeral key pair for one handshake: the spare, else one made now."""
        return self.spare.pop() if self.spare else KeyPair.generate()

    def prepare(self) -> None:
        """Make the next handshake's ephemeral key now, off that handshake's critical path
        (a node calls this once its datagrams are out). Each key still serves once."""
        if not self.spare:
            self.spare.append(KeyPair.generate())

    def hello(self, timestamp: int, boot_id: int, params: TransportParameters) -> bytes:
        return HelloPayload(
            self.address, self.identity.public.ed25519, self.binding, timestamp, boot_id, params
        ).encode()


# Bindings verified in this process, oldest first. A binding never changes for a
# key, so a handshake with a peer seen before (a reconnect, a rekey, another node
# in the process) skips the Ed25519 check, about 100 µs of a side's 300-400 µs.
# Only good signatures are kept, keyed by everything that was checked.
_verified: dict[tuple[bytes, bytes, bytes], PublicIdentity] = {}
MAX_VERIFIED_BINDINGS: Final = 4096


def bound_identity(x25519: bytes, ed25519: bytes, signature: bytes) -> PublicIdentity:
    """The identity whose Ed25519 key signed its X25519 key; FrameError if it did not."""
    key = (x25519, ed25519, signature)
    identity = _verified.get(key)
    if identity is not None:
        return identity
    try:
        identity = PublicIdentity(x25519, ed25519)
    except ValueError:
        raise FrameError("invalid Ed25519 key") from None
    if not identity.verify(signature, BIND_LABEL + x25519):
        raise FrameError("the binding signature is invalid")
    if len(_verified) >= MAX_VERIFIED_BINDINGS:
        with contextlib.suppress(KeyError, RuntimeError, StopIteration):  # nodes on threads
            del _verified[next(iter(_verified))]
    _verified[key] = identity
    return identity


def verify_hello(payload: bytes, remote_static: bytes) -> tuple[HelloPayload, PublicIdentity]:
    """Decode a handshake payload and check that it binds `remote_static` to its Ed25519 key."""
    hello = HelloPayload.decode(payload)
    try:
        identity = bound_identity(remote_static, hello.ed25519, hello.signature)
    except FrameError as exc:
        raise FrameError(f"handshake payload: {exc}") from None
    return hello, identity


class Session:
    """One set of transport keys with the peer and the indexes that name them."""

    __slots__ = (
        "created",
        "local_index",
        "recv",
        "remote_index",
        "replay",
        "send",
        "sent",
    )

    def __init__(
        self,
        *,
        local_index: int,
        remote_index: int,
        send: CipherState,
        recv: CipherState,
        created: float,
    ) -> None:
        self.local_index = local_index
        self.remote_index = remote_index
        self.send = send
        self.recv = recv
        self.replay = ReplayWindow()
        self.created = created
        self.sent = 0

    def seal(self, counter: int, payload: bytes) -> bytes:
        header = DataHeader.pack(self.remote_index, counter)
        self.sent += 1
        return header + self.send.encrypt_with_nonce(counter, header, payload)

    def open(self, counter: int, datagram: bytes) -> bytes | None:
        """The plaintext, or None for a replay or a forgery (nothing is recorded then)."""
        if not self.replay.check(counter):
            return None
        header = datagram[: DataHeader.size]
        try:
            plaintext = self.recv.decrypt_with_nonce(counter, header, datagram[DataHeader.size :])
        except NoiseDecryptError:
            return None
        self.replay.mark(counter)
        return plaintext


class PendingInitiation:
    """An initiation we sent and whose response we await."""

    __slots__ = ("handshake", "local_index", "mac1")

    def __init__(self, handshake: HandshakeState, local_index: int, mac1: bytes) -> None:
        self.handshake = handshake
        self.local_index = local_index
        self.mac1 = mac1  # binds a cookie reply to this initiation

    @classmethod
    def start(
        cls,
        keys: LocalKeys,
        remote_static: bytes,
        local_index: int,
        hello: bytes,
        cookie: bytes | None = None,
    ) -> tuple[PendingInitiation, bytes]:
        hs = keys.handshake(initiator=True, remote_static=remote_static, ephemeral=keys.ephemeral())
        datagram = HandshakeInit(local_index, hs.write_message(hello)).encode(
            mac1_key(remote_static), cookie
        )
        return cls(hs, local_index, datagram[-2 * MAC_SIZE : -MAC_SIZE]), datagram

    def read_refusal(self, response: HandshakeResponse) -> str:
        """The reason in an authenticated refusal; raises NoiseDecryptError or FrameError."""
        payload = self.handshake.read_message(response.noise)
        if not payload.startswith(REFUSAL_LABEL):
            raise FrameError("refusal without its label")
        return payload[len(REFUSAL_LABEL) :].decode("utf-8", "replace")

    def finish(
        self, response: HandshakeResponse, now: float
    ) -> tuple[Session, HelloPayload, PublicIdentity]:
        """Complete with the peer's response; raises NoiseDecryptError or FrameError."""
        payload = self.handshake.read_message(response.noise)
        rs = self.handshake.remote_static
        assert rs is not None
        hello, identity = verify_hello(payload, rs)
        session = Session(
            local_index=self.local_index,
            remote_index=response.sender_index,
            send=self.handshake.send_cipher,
            recv=self.handshake.receive_cipher,
            created=now,
        )
        return session, hello, identity


@dataclass(slots=True)
class AcceptedInitiation:
    """A decrypted, authenticated initiation, before any tunnel state is touched."""

    handshake: HandshakeState
    sender_index: int
    remote_static: bytes
    hello: HelloPayload
    identity: PublicIdentity

    def respond(
        self,
        keys: LocalKeys,
        local_index: int,
        hello: bytes,
        now: float,
    ) -> tuple[Session, bytes]:
        self.handshake.e = keys.ephemeral()
        datagram = HandshakeResponse(
            local_index, self.sender_index, self.handshake.write_message(hello)
        ).encode(mac1_key(self.remote_static))
        session = Session(
            local_index=local_index,
            remote_index=self.sender_index,
            send=self.handshake.send_cipher,
            recv=self.handshake.receive_cipher,
            created=now,
        )
        return session, datagram

    def refuse(self, keys: LocalKeys, reason: str) -> bytes:
        """A refusal: message 2 of the handshake carrying `reason`, so only the initiator reads it.

        Authenticated like a response (only we can write it), but no session
        is kept: the keys it derives are thrown away.
        """
        noise = self.handshake.write_message(REFUSAL_LABEL + reason.encode()[:200])
        return HandshakeResponse(0, self.sender_index, noise, refusal=True).encode(
            mac1_key(self.remote_static)
        )


REFUSAL_LABEL: Final = b"overlay_httpx refused v1:"


def accept_initiation(
    keys: LocalKeys, init: HandshakeInit, drop: Callable[[str], None]
) -> AcceptedInitiation | None:
    """Run the responder's half of message 1; None (and a counted drop) if it fails."""
    hs = keys.handshake(initiator=False)
    try:
        payload = hs.read_message(init.noise)
    except NoiseDecryptError:
        drop("auth_failure")
        return None
    rs = hs.remote_static
    assert rs is not None
    try:
        hello, identity = verify_hello(payload, rs)
    except FrameError:
        drop("malformed")
        return None
    return AcceptedInitiation(hs, init.sender_index, rs, hello, identity)
