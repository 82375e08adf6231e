"""Speech-to-text stand-in: ``POST /v1/transcribe`` turns "audio" into a transcript.

A CPU stand-in for a Whisper-like model, so the pipeline runs anywhere: it waits for the
compute delay (default 200 ms; ``--compute-ms`` or ``$PIPELINE_COMPUTE_MS``) in place of
GPU time and reports the time it spent in the ``x-compute-ms`` response header, which
lets the orchestrator split each call into compute and transport. The "audio" is speech
as UTF-8 text in base64 (a real client would send WAV bytes); other bytes come back as a
deterministic description of themselves. ``{"text": ...}`` is accepted as well.

On its own machine::

    python -m examples.pipeline.stt --rendezvous HOST:9000 --bind 0.0.0.0:0
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Sequence

import anyio
from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel

from .common import compute_seconds, main_service, report_compute

MODEL = "stt-standin"


class TranscribeRequest(BaseModel):
    audio_b64: str | None = None
    text: str | None = None


class Transcript(BaseModel):
    text: str
    audio_bytes: int
    model: str = MODEL


def transcribe(audio: bytes) -> str:
    """The stand-in model: speech-as-text is normalised, anything else described."""
    try:
        text = " ".join(audio.decode("utf-8").split())
    except UnicodeDecodeError:
        text = ""
    if text and text.isprintable():
        return text
    return f"[{len(audio)} bytes of audio, sha256 {hashlib.sha256(audio).hexdigest()[:12]}]"


def create_app(compute_ms: float | None = None) -> FastAPI:
    """The service, with `compute_ms` of stand-in compute per request."""
    delay = compute_seconds(compute_ms)
    app = FastAPI(title="speech-to-text stand-in")

    @app.get("/health")
    async def health() -> dict[str, object]:
        return {"status": "ok", "model": MODEL, "compute_ms": delay * 1000}

    @app.post("/v1/transcribe")
    async def transcribe_audio(body: TranscribeRequest, response: Response) -> Transcript:
        started = time.perf_counter()
        if body.audio_b64 is not None:
            try:
                audio = base64.b64decode(body.audio_b64, validate=True)
            except binascii.Error:
                raise HTTPException(422, "audio_b64 is not valid base64") from None
        elif body.text is not None:
            audio = body.text.encode()
        else:
            raise HTTPException(422, "send audio_b64 (or text)")
        await anyio.sleep(delay)  # the GPU's time, in this stand-in
        result = Transcript(text=transcribe(audio), audio_bytes=len(audio))
        report_compute(response, started)
        return result

    return app


def main(argv: Sequence[str] | None = None) -> None:
    main_service(create_app, kind="stt", description=__doc__, argv=argv)


if __name__ == "__main__":
    main()
