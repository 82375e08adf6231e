"""Helpers for node tests: pairs of nodes that know each other, echo servers, payloads."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from overlay_httpx import Identity, Node, OverlayListener, OverlayStream


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
