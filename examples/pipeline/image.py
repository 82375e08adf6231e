"""Image-generation stand-in: ``POST /v1/generate`` returns a tiny deterministic PNG.

A CPU stand-in for a diffusion model: after the compute delay (default 200 ms;
``--compute-ms`` or ``$PIPELINE_COMPUTE_MS``, reported in the ``x-compute-ms`` header)
it answers with a real PNG, a small gradient whose colours come from the prompt's
SHA-256, so the same prompt always gives the same image. It stays tiny (16x16 by
default, about 200 bytes) so the demo measures the transport, not a payload.

On its own machine::

    python -m examples.pipeline.image --rendezvous HOST:9000 --bind 0.0.0.0:0
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
import zlib
from collections.abc import Sequence

import anyio
from fastapi import FastAPI, Response
from pydantic import BaseModel, Field

from .common import compute_seconds, main_service, report_compute

MODEL = "image-standin"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class GenerateRequest(BaseModel):
    prompt: str
    size: int = Field(16, ge=1, le=64)


class Image(BaseModel):
    png_b64: str
    sha256: str
    width: int
    height: int
    bytes: int
    model: str = MODEL


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def render(prompt: str, size: int) -> bytes:
    """A `size` x `size` RGB PNG: a diagonal gradient between two colours of the prompt's hash."""
    seed = hashlib.sha256(prompt.encode()).digest()
    start, end = seed[0:3], seed[3:6]
    rows = bytearray()
    for y in range(size):
        rows.append(0)  # filter: none
        for x in range(size):
            t = (x + y) / max(2 * (size - 1), 1)
            rows += bytes(round(a + (b - a) * t) for a, b in zip(start, end, strict=True))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(bytes(rows), 9))
        + _chunk(b"IEND", b"")
    )


def create_app(compute_ms: float | None = None) -> FastAPI:
    """The service, with `compute_ms` of stand-in compute per request."""
    delay = compute_seconds(compute_ms)
    app = FastAPI(title="image generation stand-in")

    @app.get("/health")
    async def health() -> dict[str, object]:
        return {"status": "ok", "model": MODEL, "compute_ms": delay * 1000}

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest, response: Response) -> Image:
        started = time.perf_counter()
        await anyio.sleep(delay)  # the GPU's time, in this stand-in
        png = render(body.prompt, body.size)
        result = Image(
            png_b64=base64.b64encode(png).decode("ascii"),
            sha256=hashlib.sha256(png).hexdigest(),
            width=body.size,
            height=body.size,
            bytes=len(png),
        )
        report_compute(response, started)
        return result

    return app


def main(argv: Sequence[str] | None = None) -> None:
    main_service(create_app, kind="image", description=__doc__, argv=argv)


if __name__ == "__main__":
    main()
