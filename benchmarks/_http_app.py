"""The FastAPI app every HTTP benchmark row serves (imported by the server processes)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse

BLOCK = b"\x5a" * (1 << 20)

app = FastAPI()


@app.post("/v1/echo")
async def echo(body: dict[str, object]) -> dict[str, object]:
    return {"echo": body}


@app.get("/bytes/{mib}")
async def blob(mib: int) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(mib):
            yield BLOCK

    return StreamingResponse(chunks(), media_type="application/octet-stream")


@app.get("/sse")
async def sse() -> StreamingResponse:
    async def tokens() -> AsyncIterator[bytes]:
        yield b"data: first\n\n"
        for i in range(3):
            await anyio.sleep(0.001)
            yield f"data: {i}\n\n".encode()

    return StreamingResponse(tokens(), media_type="text/event-stream")
