"""LLM stand-in: ``POST /v1/completions`` returns text, or streams it as server-sent events.

A CPU stand-in for a language model: the completion is a deterministic list of the
prompt's distinctive words ("Key points: ..."), produced over the compute delay
(default 200 ms; ``--compute-ms`` or ``$PIPELINE_COMPUTE_MS``). Without streaming the
answer is JSON and the time spent is in the ``x-compute-ms`` header. With
``"stream": true`` tokens go out as SSE events spread over the compute time, so the
first one arrives long before the last (what a chat UI needs); the final event carries
``compute_ms``, since headers are sent before the compute starts. ``GET /health``
reports the streams in progress.

On its own machine::

    python -m examples.pipeline.llm --rendezvous HOST:9000 --bind 0.0.0.0:0
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import anyio
from fastapi import FastAPI, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from .common import compute_seconds, elapsed_ms, main_service, report_compute

MODEL = "llm-standin"
_STOP_WORDS = frozenset(
    {"about", "after", "also", "from", "have", "into", "just", "only", "over", "points"}
    | {"summarize", "than", "that", "their", "them", "then", "there", "these", "they"}
    | {"this", "very", "what", "when", "which", "while", "will", "with", "would", "your"}
)


class CompletionRequest(BaseModel):
    prompt: str
    max_tokens: int = Field(16, ge=1, le=512)
    stream: bool = False


class Completion(BaseModel):
    text: str
    tokens: int
    model: str = MODEL


def complete(prompt: str, max_tokens: int) -> list[str]:
    """The stand-in model's tokens (each keeps its trailing space): the key words, in order."""
    words: list[str] = []
    for word in re.findall(r"[a-z0-9']+", prompt.lower()):
        if len(word) > 3 and word not in _STOP_WORDS and word not in words:
            words.append(word)
    text = "Key points: " + (", ".join(words) or "none") + "."
    return re.findall(r"\S+\s*", text)[:max_tokens]


def _event(data: object) -> str:
    return f"data: {json.dumps(data)}\n\n"


@dataclass
class _Streams:
    """Streams whose generator is still running (reported by ``GET /health``)."""

    active: int = 0


def create_app(compute_ms: float | None = None) -> FastAPI:
    """The service, with `compute_ms` of stand-in compute per request."""
    delay = compute_seconds(compute_ms)
    streams = _Streams()
    app = FastAPI(title="LLM stand-in")

    @app.get("/health")
    async def health() -> dict[str, object]:
        return {
            "status": "ok",
            "model": MODEL,
            "compute_ms": delay * 1000,
            "streams_in_progress": streams.active,
        }

    async def token_events(tokens: list[str]) -> AsyncIterator[str]:
        started = time.perf_counter()
        streams.active += 1
        try:
            for index, token in enumerate(tokens):
                await anyio.sleep(delay / len(tokens))  # the compute, spread over the tokens
                yield _event({"index": index, "token": token})
            text = "".join(tokens)
            yield _event({"done": True, "text": text, "compute_ms": elapsed_ms(started)})
            yield "data: [DONE]\n\n"
        finally:
            streams.active -= 1

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, response: Response
    ) -> Completion | StreamingResponse:
        started = time.perf_counter()
        tokens = complete(body.prompt, body.max_tokens)
        if body.stream:
            return StreamingResponse(
                token_events(tokens),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        await anyio.sleep(delay)  # the GPU's time, in this stand-in
        result = Completion(text="".join(tokens), tokens=len(tokens))
        report_compute(response, started)
        return result

    return app


def main(argv: Sequence[str] | None = None) -> None:
    main_service(create_app, kind="llm", description=__doc__, argv=argv)


if __name__ == "__main__":
    main()
