"""One stage of bench_chain.py's three-stage model pipeline (imported by the server processes).

A stand-in for a model service: it "computes" for `$CHAIN_COMPUTE_MS` milliseconds
(an async sleep, so the server's CPU stays free, as it would while a GPU works) and
answers with a small JSON that the next stage takes as its input. It reports how
long the handler itself took, so the orchestrator can separate timer overshoot
from transport overhead.
"""

from __future__ import annotations

import os
import time

import anyio
from fastapi import FastAPI

STAGE = os.environ.get("CHAIN_STAGE", "stage")
COMPUTE_S = float(os.environ.get("CHAIN_COMPUTE_MS", "20")) / 1000

app = FastAPI()


@app.post("/v1/infer")
async def infer(body: dict[str, object]) -> dict[str, object]:
    start = time.perf_counter()
    await anyio.sleep(COMPUTE_S)
    result = f"{STAGE}({str(body.get('input', ''))[:48]})"
    return {"stage": STAGE, "result": result, "handler_ms": (time.perf_counter() - start) * 1e3}
