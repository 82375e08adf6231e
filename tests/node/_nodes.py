"""Helpers for node tests: pairs of nodes that know each other, echo servers, payloads."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio

from overlay_httpx import Address, Identity, Node, OverlayListener, OverlayStream
from overlay_httpx._identity import default_address


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that are not a repeating short pattern."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


def introduce(a: Node, b: Node) -> None:
    a.add_peer(b.address, b.public, b.endpoint)
    b.add_peer(a.address, a.public, a.endpoint)


@contextmanager
def silent_peer(node: Node, identity: Identity | None = None) -> Iterator[tuple[Address, int]]:
    """A peer of `node` whose UDP port never answers: (its address, the port).

    Closing the socket (at the end) frees the port for a real node with `identity`,
    where `node`'s handshake retries then go.
    """
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    public = (identity or Identity.generate()).public
    address = default_address(public)
    node.add_peer(address, public, silent.getsockname())
    try:
        yield address, silent.getsockname()[1]
    finally:
        silent.close()


@asynccontextmanager
async def node_pair(**options: Any) -> AsyncIterator[tuple[Node, Node]]:
    async with Node(Identity.generate(), **options) as a, Node(Identity.generate(), **options) as b:
        introduce(a, b)
        yield a, b


async def echo(stream: OverlayStream) -> None:
    """Send back every byte, then half-close when the peer does; a broken stream ends it."""
    try:
        while True:
            try:
                data = await stream.receive()
            except anyio.EndOfStream:
                await stream.send_eof()
                return
            await stream.send(data)
    except anyio.BrokenResourceError:
        return


async def serve_echo(listener: OverlayListener) -> None:
    await listener.serve(echo)


async def send_all_then_eof(stream: OverlayStream, data: bytes, chunk: int = 1 << 20) -> None:
    for offset in range(0, len(data), chunk):
        await stream.send(data[offset : offset + chunk])
    await stream.send_eof()


async def receive_all(stream: OverlayStream) -> bytes:
    parts = []
    while True:
        try:
            parts.append(await stream.receive())
        except anyio.EndOfStream:
            return b"".join(parts)


async def sha_of_stream(stream: OverlayStream) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    while True:
        try:
            data = await stream.receive(1 << 20)
        except anyio.EndOfStream:
            return digest.hexdigest(), total
        digest.update(data)
        total += len(data)
