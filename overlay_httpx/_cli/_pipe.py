"""`pipe`: copy bytes both ways between two anyio byte streams, half-close included.

This is what a gateway does with each connection: a TCP socket on one side,
an overlay stream on the other. Each direction ends on its own (end of
stream on one side becomes ``send_eof`` on the other), so request/response
protocols that half-close work; if either side fails, both are aborted at
once (an overlay stream is reset, a TCP socket is closed with RST) so
neither end mistakes a broken exchange for a complete one.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass

import anyio
from anyio.abc import ByteStream, SocketAttribute

from .._exceptions import OverlayError
from .._node import OverlayStream

__all__ = ["PipeResult", "abort", "pipe"]

CHUNK_SIZE = 65536

_FAILURES = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, OverlayError)


@dataclass
class PipeResult:
    """What happened: bytes copied each way, and the first failure (None when clean)."""

    a_to_b: int = 0
    b_to_a: int = 0
    error: BaseException | None = None
    failed: ByteStream | None = None
    """The stream whose receive, send or send_eof raised `error`."""


async def pipe(a: ByteStream, b: ByteStream, *, chunk_size: int = CHUNK_SIZE) -> PipeResult:
    """Copy a→b and b→a until both directions have ended, then close both streams.

    Returns normally whatever the streams do (a failure is in the result);
    if the caller is cancelled both streams are aborted and the cancellation
    goes on.
    """
    result = PipeResult()
    clean = False
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(_copy, a, b, True, result, group.cancel_scope, chunk_size)
            group.start_soon(_copy, b, a, False, result, group.cancel_scope, chunk_size)
        clean = result.error is None
    finally:
        with anyio.CancelScope(shield=True):
            for stream in (a, b):
                if clean:
                    with contextlib.suppress(*_FAILURES):
                        await stream.aclose()
                else:
                    await abort(stream)
    return result


async def _copy(
    source: ByteStream,
    sink: ByteStream,
    forward: bool,
    result: PipeResult,
    scope: anyio.CancelScope,
    chunk_size: int,
) -> None:
    current = source
    try:
        while True:
            current = source
            try:
                data = await source.receive(chunk_size)
            except anyio.EndOfStream:
                break
            current = sink
            await sink.send(data)
            if forward:
                result.a_to_b += len(data)
            else:
                result.b_to_a += len(data)
        current = sink
        await sink.send_eof()
    except _FAILURES as exc:
        if result.error is None:
            result.error, result.failed = exc, current
        scope.cancel()


async def abort(stream: ByteStream) -> None:
    """Close so that the other end sees an abort, not a clean end of stream."""
    if isinstance(stream, OverlayStream):
        stream.reset()
        return
    raw = stream.extra(SocketAttribute.raw_socket, None)  # asyncio gives a TransportSocket
    if raw is not None and getattr(raw, "type", None) == socket.SOCK_STREAM:
        with contextlib.suppress(OSError):  # linger 0: close() sends RST
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with anyio.CancelScope(shield=True), contextlib.suppress(*_FAILURES):
        await stream.aclose()
