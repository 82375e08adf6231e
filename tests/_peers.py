"""A peer that does not answer (yet): a UDP port that takes datagrams and says nothing."""

from __future__ import annotations

import socket
from types import TracebackType

from overlay_httpx import Identity, Node
from overlay_httpx._identity import default_address


class SilentPeer:
    """A peer of `node` whose UDP port never answers, until `close` frees the port
    for a real node with `identity` (where `node`'s handshake retries then go)."""

    def __init__(self, node: Node, identity: Identity | None = None) -> None:
        self.identity = identity or Identity.generate()
        self.address = default_address(self.identity.public)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        node.add_peer(self.address, self.identity.public, ("127.0.0.1", self.port))

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> SilentPeer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
