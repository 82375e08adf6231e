"""The orchestrator: ``POST /chain`` runs speech-to-text, then the LLM, then image generation.

It is itself an overlay node (hostname ``orchestrator``), so any overlay client can call
it. It knows the model services by tag only, never by address:

* at start-up it asks the rendezvous for each kind (``find_by_tag``) and calls every
  service's ``/health``, which opens the tunnels once (the handshake is paid here, not by
  the first user request); ``GET /health`` lists what it found and what setting up each
  tunnel cost;
* each ``/chain`` stage posts to ``http://<kind>.tag.overlay/...``, which the transport
  resolves through the rendezvous (cached for a few seconds) and spreads over every node
  carrying the tag, so services can be added or replaced without configuration.

All calls go through one shared `httpx.AsyncClient` on an `OverlayTransport`: one
persistent tunnel and one HTTP/2 connection per service, however many requests. Each
stage's latency is split into the compute the service reports in ``x-compute-ms`` and
the rest, transport = total - compute.

On its own machine::

    python -m examples.pipeline.orchestrator --rendezvous HOST:9000 --bind 0.0.0.0:0
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from overlay_httpx import Node, OverlayTransport

from .common import COMPUTE_HEADER, KINDS, elapsed_ms, main_node

logger = logging.getLogger("examples.pipeline.orchestrator")


class ChainRequest(BaseModel):
    audio_b64: str | None = None
    text: str | None = None


class StageTiming(BaseModel):
    stage: str
    service: str
    """The overlay address that answered."""
    total_ms: float
    compute_ms: float
    transport_ms: float


class Timing(BaseModel):
    stages: list[StageTiming]
    total_ms: float
    compute_ms: float
    transport_ms: float
    """Everything but compute: the three calls' transport and the orchestrator's own work."""


class ChainResponse(BaseModel):
    transcript: str
    analysis: str
    image: dict[str, Any]
    timing: Timing


class Service(BaseModel):
    kind: str
    address: str
    hostname: str | None
    setup_ms: float
    """The first ``/health`` call: tunnel handshake, HTTP/2 set-up and one round trip."""


@dataclass
class _State:
    client: httpx.AsyncClient | None = None
    services: list[Service] = field(default_factory=list)


async def discover(node: Node, client: httpx.AsyncClient) -> list[Service]:
    """Every registered model service, found by tag, with its tunnel opened."""
    found: list[Service] = []
    for kind in KINDS:
        records = await node.find_by_tag(kind)
        if not records:
            logger.warning("no %r service is registered yet; /chain will look again", kind)
        for record in records:
            started = time.perf_counter()
            try:
                (await client.get(f"http://{record.address.host}/health")).raise_for_status()
            except httpx.HTTPError as exc:
                logger.warning("%s service %s: %s", kind, record.address, exc)
                continue
            setup = elapsed_ms(started)
            address = str(record.address)
            found.append(
                Service(kind=kind, address=address, hostname=record.hostname, setup_ms=setup)
            )
    return found


async def call_stage(
    client: httpx.AsyncClient, kind: str, path: str, payload: dict[str, Any]
) -> tuple[dict[str, Any], StageTiming]:
    """POST `payload` to any node tagged `kind`; its JSON answer and the stage's timing."""
    started = time.perf_counter()
    try:
        response = await client.post(f"http://{kind}.tag.overlay{path}", json=payload)
    except httpx.HTTPError as exc:
        raise HTTPException(502, f"{kind} stage: {type(exc).__name__}: {exc}") from exc
    total = elapsed_ms(started)
    if response.status_code != 200:
        raise HTTPException(502, f"{kind} stage: HTTP {response.status_code}: {response.text}")
    compute = float(response.headers.get(COMPUTE_HEADER, "0"))
    peer = response.extensions["overlay"]["peer_address"]
    timing = StageTiming(
        stage=kind,
        service=str(peer),
        total_ms=round(total, 3),
        compute_ms=compute,
        transport_ms=round(total - compute, 3),
    )
    return response.json(), timing


def create_app(node: Node, *, timeout: float = 60.0) -> FastAPI:
    """The orchestrator's app; its HTTP client uses `node`'s tunnels."""
    state = _State()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        transport = OverlayTransport(node)
        async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
            state.client = client
            state.services = await discover(node, client)
            yield
            state.client = None

    app = FastAPI(title="pipeline orchestrator", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, object]:
        return {"status": "ok", "services": [s.model_dump() for s in state.services]}

    @app.post("/chain")
    async def chain(body: ChainRequest) -> ChainResponse:
        client = state.client
        assert client is not None, "the lifespan opens the client"
        if body.audio_b64 is None and body.text is None:
            raise HTTPException(422, "send audio_b64 (or text)")
        started = time.perf_counter()
        heard, stt = await call_stage(
            client, "stt", "/v1/transcribe", body.model_dump(exclude_none=True)
        )
        said, llm = await call_stage(
            client,
            "llm",
            "/v1/completions",
            {"prompt": f"Summarize the key points: {heard['text']}", "max_tokens": 24},
        )
        image, img = await call_stage(
            client, "image", "/v1/generate", {"prompt": f"An infographic of {said['text']}"}
        )
        total = elapsed_ms(started)
        compute = stt.compute_ms + llm.compute_ms + img.compute_ms
        return ChainResponse(
            transcript=heard["text"],
            analysis=said["text"],
            image={k: image[k] for k in ("sha256", "bytes", "width", "height", "png_b64")},
            timing=Timing(
                stages=[stt, llm, img],
                total_ms=round(total, 3),
                compute_ms=round(compute, 3),
                transport_ms=round(total - compute, 3),
            ),
        )

    return app


def main(argv: Sequence[str] | None = None) -> None:
    def make_app(node: Node, args: argparse.Namespace) -> FastAPI:
        return create_app(node)

    main_node(
        make_app,
        kind="orchestrator",
        tags=["orchestrator"],
        description=__doc__,
        argv=argv,
        compute=False,
    )


if __name__ == "__main__":
    main()
