"""Node identities: an X25519 key pair for Noise and an Ed25519 key pair for signatures.

The X25519 key is the node's static Noise key: it is what a handshake proves
and what trust policies name. The Ed25519 key signs records and tokens that
must be checked by someone who was not on the tunnel. Both travel together in
a `PublicIdentity`, whose text form is safe to paste into configuration.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from ._address import Address
from ._exceptions import (
    IdentityCorrupt,
    IdentityExists,
    IdentityInsecure,
    IdentityNotFound,
)

__all__ = ["Identity", "PublicIdentity", "default_address"]

KEY_SIZE: Final = 32
_PUBLIC_PREFIX: Final = "ovid1_"
_CHECK_SIZE: Final = 4
_FILE_FORMAT: Final = "overlay_httpx-identity"
_FILE_VERSION: Final = 1
_PUBLIC_FORM: Final = f"'{_PUBLIC_PREFIX}' followed by 91 base64url characters"


def _raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


class PublicIdentity:
    """The public half of an `Identity`: immutable, hashable, printable.

    ``str(pub)`` is a self-checking text form that `parse` reads back;
    `fingerprint` is a short form for logs and humans.
    """

    __slots__ = ("_ed25519", "_raw", "_x25519")

    _x25519: X25519PublicKey
    _ed25519: Ed25519PublicKey
    _raw: bytes

    def __init__(self, x25519: bytes, ed25519: bytes) -> None:
        if len(x25519) != KEY_SIZE or len(ed25519) != KEY_SIZE:
            raise IdentityCorrupt(
                f"public keys must be {KEY_SIZE} bytes each, got {len(x25519)} and {len(ed25519)}"
            )
        try:
            x_key = X25519PublicKey.from_public_bytes(bytes(x25519))
            e_key = Ed25519PublicKey.from_public_bytes(bytes(ed25519))
        except ValueError as exc:
            raise IdentityCorrupt(f"invalid public key bytes: {exc}") from None
        object.__setattr__(self, "_x25519", x_key)
        object.__setattr__(self, "_ed25519", e_key)
        object.__setattr__(self, "_raw", bytes(x25519) + bytes(ed25519))

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicIdentity:
        """Decode the 64-byte wire form (X25519 key, then Ed25519 key)."""
        if len(data) != 2 * KEY_SIZE:
            raise IdentityCorrupt(f"a public identity is {2 * KEY_SIZE} bytes, got {len(data)}")
        return cls(data[:KEY_SIZE], data[KEY_SIZE:])

    @classmethod
    def parse(cls, text: str) -> PublicIdentity:
        """Read the text form produced by ``str(public_identity)``."""
        if not isinstance(text, str):
            raise IdentityCorrupt(f"expected a public identity string, got {text!r}")
        clean = text.strip()
        shown = clean if len(clean) <= 40 else clean[:37] + "..."
        if not clean.startswith(_PUBLIC_PREFIX):
            raise IdentityCorrupt(f"invalid public identity {shown!r}: expected {_PUBLIC_FORM}")
        body = clean[len(_PUBLIC_PREFIX) :]
        try:
            blob = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise IdentityCorrupt(
                f"invalid public identity {shown!r}: expected {_PUBLIC_FORM}"
            ) from None
        if len(blob) != 2 * KEY_SIZE + _CHECK_SIZE or _b64(blob) != body:
            raise IdentityCorrupt(f"invalid public identity {shown!r}: expected {_PUBLIC_FORM}")
        raw, check = blob[: 2 * KEY_SIZE], blob[2 * KEY_SIZE :]
        if hashlib.sha256(raw).digest()[:_CHECK_SIZE] != check:
            raise IdentityCorrupt(f"invalid public identity {shown!r}: checksum mismatch (typo?)")
        return cls.from_bytes(raw)

    @property
    def x25519(self) -> bytes:
        """The raw static Noise public key."""
        return self._raw[:KEY_SIZE]

    @property
    def ed25519(self) -> bytes:
        """The raw Ed25519 verification key."""
        return self._raw[KEY_SIZE:]

    @property
    def x25519_key(self) -> X25519PublicKey:
        return self._x25519

    @property
    def ed25519_key(self) -> Ed25519PublicKey:
        return self._ed25519

    @property
    def fingerprint(self) -> str:
        """16 hex digits in four groups, e.g. ``3f2a:9c1d:0b7e:44a1``."""
        h = hashlib.sha256(self._raw).hexdigest()[:16]
        return ":".join(h[i : i + 4] for i in range(0, 16, 4))

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when `signature` is this identity's Ed25519 signature of `data`."""
        try:
            self._ed25519.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def to_bytes(self) -> bytes:
        return self._raw

    def __bytes__(self) -> bytes:
        return self._raw

    def __str__(self) -> str:
        return _PUBLIC_PREFIX + _b64(self._raw + hashlib.sha256(self._raw).digest()[:_CHECK_SIZE])

    def __repr__(self) -> str:
        return f"PublicIdentity(fingerprint='{self.fingerprint}')"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicIdentity):
            return NotImplemented
        return self._raw == other._raw

    def __hash__(self) -> int:
        return hash(("overlay_httpx.PublicIdentity", self._raw))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("PublicIdentity is immutable")

    def __reduce__(self) -> tuple[type[PublicIdentity], tuple[bytes, bytes]]:
        return (PublicIdentity, (self.x25519, self.ed25519))


_ADDRESS_DOMAIN: Final = b"overlay_httpx address v1"


def default_address(identity: PublicIdentity, network: int = 1) -> Address:
    """The address a node takes when none is given: derived from its key, so stable."""
    digest = hashlib.sha256(_ADDRESS_DOMAIN + identity.x25519).digest()
    node = int.from_bytes(digest[:4], "big")
    if node in (0, 0xFFFF_FFFF):  # reserved: unspecified and broadcast
        node = 1
    return Address(network, node)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Identity:
    """A node's secret keys. Keep it in a file only this user can read.

    The secrets never appear in ``repr`` or ``str``; use `save` to persist them.
    """

    __slots__ = ("_ed25519", "_public", "_x25519")

    def __init__(self, x25519: X25519PrivateKey, ed25519: Ed25519PrivateKey) -> None:
        self._x25519 = x25519
        self._ed25519 = ed25519
        self._public = PublicIdentity(
            _raw_public(x25519.public_key()), _raw_public(ed25519.public_key())
        )

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity from the operating system's random source."""
        return cls(X25519PrivateKey.generate(), Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, x25519: bytes, ed25519: bytes) -> Identity:
        """Rebuild from raw 32-byte private keys (tests and key import)."""
        try:
            return cls(
                X25519PrivateKey.from_private_bytes(x25519),
                Ed25519PrivateKey.from_private_bytes(ed25519),
            )
        except ValueError as exc:
            raise IdentityCorrupt(f"invalid private key bytes: {exc}") from None

    @property
    def public(self) -> PublicIdentity:
        return self._public

    @property
    def x25519_key(self) -> X25519PrivateKey:
        """The static Noise private key."""
        return self._x25519

    @property
    def ed25519_key(self) -> Ed25519PrivateKey:
        return self._ed25519

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of `data` that `PublicIdentity.verify` accepts."""
        return self._ed25519.sign(data)

    def __repr__(self) -> str:
        return f"Identity(public={self._public!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return _raw_private(self._x25519) == _raw_private(other._x25519) and _raw_private(
            self._ed25519
        ) == _raw_private(other._ed25519)

    __hash__ = None  # type: ignore[assignment]  # secrets are not dictionary keys

    # -- files ----------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the identity to `path` atomically with mode 0600.

        Refuses to replace an existing file unless ``overwrite=True``; a crash
        midway leaves either the old file or the new one, never half of one.
        """
        target = Path(path).expanduser()
        document = {
            "format": _FILE_FORMAT,
            "version": _FILE_VERSION,
            "x25519": _raw_private(self._x25519).hex(),
            "ed25519": _raw_private(self._ed25519).hex(),
            "public": str(self._public),
        }
        data = (json.dumps(document, indent=1) + "\n").encode("ascii")
        directory = target.parent
        if not directory.is_dir():
            raise IdentityNotFound(f"cannot save identity to {str(target)!r}: no such directory")
        fd, tmp_name = tempfile.mkstemp(prefix=".identity-", dir=directory)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp_name, target)
            else:
                try:
                    os.link(tmp_name, target)  # atomic, and fails if target exists
                except FileExistsError:
                    raise IdentityExists(
                        f"identity file {str(target)!r} already exists; "
                        "pass overwrite=True to replace it"
                    ) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        _fsync_directory(directory)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read an identity saved by `save`.

        Raises `IdentityNotFound`, `IdentityInsecure` (the file is readable by
        group or others) or `IdentityCorrupt`, each naming the file.
        """
        target = Path(path).expanduser()
        shown = str(target)
        try:
            fd = os.open(target, os.O_RDONLY)
        except FileNotFoundError:
            raise IdentityNotFound(f"identity file {shown!r} does not exist") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise IdentityCorrupt(f"identity path {shown!r} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            if os.name == "posix" and st.st_mode & 0o077:
                raise IdentityInsecure(
                    f"identity file {shown!r} has mode {stat.S_IMODE(st.st_mode):04o}; "
                    f"it must not be readable by group or others (chmod 600 {shown})"
                )
            raw = f.read(64 * 1024)
        return cls._decode(raw, shown)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load `path`, or create a new identity there on first use."""
        try:
            return cls.load(path)
        except IdentityNotFound:
            pass
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity = cls.generate()
        try:
            identity.save(path)
        except IdentityExists:  # another process won the race: use theirs
            return cls.load(path)
        return identity

    @classmethod
    def _decode(cls, raw: bytes, shown: str) -> Identity:
        expected = f"a JSON {_FILE_FORMAT!r} document written by Identity.save()"
        try:
            document = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise IdentityCorrupt(
                f"identity file {shown!r} is corrupt: expected {expected}"
            ) from None
        if not isinstance(document, dict) or document.get("format") != _FILE_FORMAT:
            raise IdentityCorrupt(f"identity file {shown!r} is corrupt: expected {expected}")
        if document.get("version") != _FILE_VERSION:
            raise IdentityCorrupt(
                f"identity file {shown!r} has version {document.get('version')!r}; "
                f"this overlay_httpx reads version {_FILE_VERSION}"
            )
        keys: list[bytes] = []
        for name in ("x25519", "ed25519"):
            value = document.get(name)
            try:
                key = bytes.fromhex(value) if isinstance(value, str) else b""
            except ValueError:
                key = b""
            if len(key) != KEY_SIZE:
                raise IdentityCorrupt(
                    f"identity file {shown!r} is corrupt: {name!r} must be {KEY_SIZE} bytes of hex"
                )
            keys.append(key)
        identity = cls.from_private_bytes(keys[0], keys[1])
        recorded = document.get("public")
        if recorded is not None and recorded != str(identity.public):
            raise IdentityCorrupt(
                f"identity file {shown!r} is corrupt: its public keys do not match its secrets"
            )
        return identity


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
