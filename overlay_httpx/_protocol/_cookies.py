"""Handshake flood protection: stateless cookies (WireGuard's mac2) and per-source limits.

A responder does Diffie-Hellman work for every initiation that passes mac1,
and mac1 only proves knowledge of the responder's public key. Under load
(more handshakes per second than `handshake_rate_limit`, with bursts of a
tenth of that, or too many handshakes that were answered and never
confirmed) it stops doing that work
for initiations without a valid `mac2` and answers them with a small COOKIE
datagram instead: no state is kept, and the reply is smaller than the
initiation, so a spoofed source gains nothing. The cookie is a MAC of the
sender's IP address and port under a secret that changes every two minutes;
only a sender that really receives at that address can learn it and prove
it in the `mac2` of its next initiation. Initiations with a valid `mac2` are
then rate-limited per source IP address.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._bucket import TokenBucket
from ._packet import MAC_SIZE, TYPE_COOKIE, compute_mac2

__all__ = ["COOKIE_SIZE", "CookieChecker", "CookieReply", "cookie_key"]

_LABEL: Final = b"overlay_httpx cookie v1"
_SECRET_LIFETIME: Final = 120.0
COOKIE_LIFETIME: Final = _SECRET_LIFETIME - 10.0
"""How long an initiator uses a cookie it was given."""
# type(1) reserved(3) receiver_index(4) nonce(12) enc(cookie)(16 + 16)
_HEAD: Final = struct.Struct("!B3xI12s")
COOKIE_SIZE: Final = _HEAD.size + MAC_SIZE + 16
_MAX_SOURCES: Final = 4096


def cookie_key(responder_static: bytes) -> bytes:
    """The AEAD key for cookie replies from the owner of `responder_static`."""
    return hashlib.blake2s(_LABEL + responder_static).digest()


class CookieReply:
    """Build and open COOKIE datagrams (the reply to an initiation sent while under load)."""

    @staticmethod
    def build(aead: AESGCM, receiver_index: int, cookie: bytes, init_mac1: bytes) -> bytes:
        """A COOKIE sealed with `aead` (an `AESGCM` of the responder's `cookie_key`)."""
        nonce = os.urandom(12)
        sealed = aead.encrypt(nonce, cookie, init_mac1)
        return _HEAD.pack(TYPE_COOKIE, receiver_index, nonce) + sealed

    @staticmethod
    def receiver_index(data: bytes) -> int | None:
        if len(data) != COOKIE_SIZE:
            return None
        return int(_HEAD.unpack_from(data)[1])

    @staticmethod
    def open(key: bytes, data: bytes, init_mac1: bytes) -> bytes | None:
        """The cookie, or None when the reply is not for the initiation with `init_mac1`."""
        if len(data) != COOKIE_SIZE:
            return None
        _, _, nonce = _HEAD.unpack_from(data)
        try:
            return AESGCM(key).decrypt(nonce, data[_HEAD.size :], init_mac1)
        except InvalidTag:
            return None


class CookieChecker:
    """The responder's side: load accounting, cookies, mac2 checks and per-source buckets."""

    def __init__(
        self,
        static_public: bytes,
        *,
        rate_limit: int,
        source_rate: float,
        source_burst: float,
    ) -> None:
        self._reply_aead = AESGCM(cookie_key(static_public))  # made once: floods reply a lot
        self._source_rate = source_rate
        self._source_burst = source_burst
        self._secrets: list[bytes] = [os.urandom(32)]
        self._secret_born: float | None = None
        # A small burst: the budget's Diffie-Hellman work is spread over the second
        # rather than done back to back, which would stall the event loop.
        self._budget = TokenBucket(rate_limit, max(1.0, rate_limit / 10))
        self._sources: dict[str, TokenBucket] = {}
        self.cookies_sent = 0
        self.handshakes_computed = 0
        """Initiations that got as far as Diffie-Hellman work."""

    def under_load(self, now: float, pending: int, max_pending: int) -> bool:
        return self._budget.available(now) < 1.0 or pending >= max_pending

    def note_handshake(self, now: float) -> None:
        """One initiation got as far as Diffie-Hellman work (mac2-proven ones may overdraw)."""
        self.handshakes_computed += 1
        self._budget.charge(1.0, now)

    def _rotate(self, now: float) -> None:
        if self._secret_born is None:
            self._secret_born = now
        elif now - self._secret_born >= _SECRET_LIFETIME:
            self._secrets = [os.urandom(32), self._secrets[0]]
            self._secret_born = now

    @staticmethod
    def _cookie(secret: bytes, addr: tuple[str, int]) -> bytes:
        source = f"{addr[0]}|{addr[1]}".encode()
        return hashlib.blake2s(source, key=secret, digest_size=MAC_SIZE).digest()

    def mac2_valid(self, data: bytes, addr: tuple[str, int], now: float) -> bool:
        self._rotate(now)
        mac2 = data[-MAC_SIZE:]
        if mac2 == bytes(MAC_SIZE):
            return False
        body = data[:-MAC_SIZE]
        return any(
            hmac.compare_digest(compute_mac2(self._cookie(secret, addr), body), mac2)
            for secret in self._secrets
        )

    def reply(
        self, sender_index: int, init_mac1: bytes, addr: tuple[str, int], now: float
    ) -> bytes:
        self._rotate(now)
        self.cookies_sent += 1
        cookie = self._cookie(self._secrets[0], addr)
        return CookieReply.build(self._reply_aead, sender_index, cookie, init_mac1)

    def allow_source(self, addr: tuple[str, int], now: float) -> bool:
        """Token bucket per source IP address, for initiations that carried a valid mac2."""
        bucket = self._sources.get(addr[0])
        if bucket is None:
            if len(self._sources) >= _MAX_SOURCES:
                self._sources.clear()  # bounded memory; a flood restarts everyone's buckets
            bucket = self._sources[addr[0]] = TokenBucket(self._source_rate, self._source_burst)
        return bucket.take(1.0, now)
