"""The three-model pipeline example (examples/pipeline) works, in process and as one command.

In process: a `Rendezvous`, the three model services, the orchestrator and a client, each
on its own node on 127.0.0.1, with ~10 ms of stand-in compute per model. Then the real
thing: ``python -m examples.pipeline`` with its five child processes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from _build import child_env

from examples.pipeline import image, llm, orchestrator, stt
from overlay_httpx import Identity, Node, OverlayTransport, Rendezvous, serve

ROOT = Path(__file__).resolve().parents[2]
DELAY_MS = 10.0
SPEECH = "Seven wizards quietly judge the boxing match"


@asynccontextmanager
async def pipeline(
    delay_ms: float = DELAY_MS,
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, Node]]]:
    """Everything on 127.0.0.1 in this process; a client on its own node, and every node."""
    async with Rendezvous() as rv, AsyncExitStack() as stack:

        async def start(hostname: str, *tags: str) -> Node:
            node = Node(Identity.generate(), rendezvous=rv.spec, tags=tags, hostname=hostname)
            return await stack.enter_async_context(node)

        nodes = {kind: await start(kind, "model-service", kind) for kind in ("stt", "llm", "image")}
        nodes["orchestrator"] = await start("orchestrator", "orchestrator")
        nodes["client"] = await start("client")
        apps = {
            "stt": stt.create_app(delay_ms),
            "llm": llm.create_app(delay_ms),
            "image": image.create_app(delay_ms),
            "orchestrator": orchestrator.create_app(nodes["orchestrator"]),  # after the services
        }
        async with anyio.create_task_group() as tg:
            for name, app in apps.items():
                await tg.start(functools.partial(serve, app, nodes[name]))
            transport = OverlayTransport(nodes["client"])
            async with httpx.AsyncClient(transport=transport, timeout=30.0) as client:
                yield client, nodes
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_chain_returns_three_results_and_a_timing_breakdown() -> None:
    async with pipeline() as (client, nodes):
        health = (await client.get("http://orchestrator.overlay/health")).json()
        assert sorted(s["kind"] for s in health["services"]) == ["image", "llm", "stt"]
        audio = base64.b64encode(SPEECH.encode()).decode()
        response = await client.post("http://orchestrator.overlay/chain", json={"audio_b64": audio})
        assert response.status_code == 200, response.text
        chain = response.json()

    assert chain["transcript"] == SPEECH
    assert chain["analysis"] == "Key points: seven, wizards, quietly, judge, boxing, match."
    png = base64.b64decode(chain["image"]["png_b64"])
    assert png.startswith(image.PNG_SIGNATURE)
    assert png == image.render(f"An infographic of {chain['analysis']}", 16)
    assert chain["image"]["sha256"] == hashlib.sha256(png).hexdigest()

    timing = chain["timing"]
    stages = timing["stages"]
    assert [s["stage"] for s in stages] == ["stt", "llm", "image"]
    assert [s["service"] for s in stages] == [
        str(nodes[k].address) for k in ("stt", "llm", "image")
    ]
    for stage in stages:
        assert DELAY_MS * 0.95 <= stage["compute_ms"] <= DELAY_MS + 100
        assert stage["transport_ms"] >= 0
        total = stage["compute_ms"] + stage["transport_ms"]
        assert stage["total_ms"] == pytest.approx(total, abs=0.01)
    assert timing["compute_ms"] == pytest.approx(sum(s["compute_ms"] for s in stages), abs=0.01)
    assert 3 * DELAY_MS * 0.95 <= timing["compute_ms"] <= 3 * DELAY_MS + 300
    assert timing["transport_ms"] >= 0
    assert timing["total_ms"] >= sum(s["total_ms"] for s in stages) - 0.01


@pytest.mark.anyio
async def test_llm_streams_its_first_token_before_the_generator_finishes() -> None:
    compute_ms, tokens = 600.0, 6  # one token every 100 ms
    prompt = "alpha bravo charlie delta echo foxtrot golf"
    body = {"prompt": prompt, "stream": True, "max_tokens": tokens}
    async with (
        Rendezvous() as rv,
        Node(Identity.generate(), rendezvous=rv.spec, hostname="llm") as model,
        Node(Identity.generate(), rendezvous=rv.spec) as caller,
        anyio.create_task_group() as tg,
    ):
        await tg.start(functools.partial(serve, llm.create_app(compute_ms), model))
        async with httpx.AsyncClient(transport=OverlayTransport(caller)) as client:
            events: list[dict[str, Any]] = []
            in_progress: list[int] = []
            started = time.perf_counter()
            async with client.stream("POST", "http://llm.overlay/v1/completions", json=body) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    events.append(json.loads(line.removeprefix("data: ")))
                    if len(events) == 1:  # ask, on the same connection, while it streams
                        first_at = time.perf_counter() - started
                        health = (await client.get("http://llm.overlay/health")).json()
                        in_progress.append(health["streams_in_progress"])
            finished_at = time.perf_counter() - started
            after = (await client.get("http://llm.overlay/health")).json()
        tg.cancel_scope.cancel()

    assert in_progress == [1]  # the generator was still running when the first token arrived
    assert after["streams_in_progress"] == 0
    assert first_at < finished_at / 2
    assert [e["index"] for e in events[:-1]] == list(range(tokens))
    done = events[-1]
    assert done["done"] is True
    assert done["text"] == "".join(e["token"] for e in events[:-1])
    assert done["text"] == "".join(llm.complete(prompt, tokens))
    assert done["compute_ms"] >= compute_ms * 0.95


def test_one_command_demo_runs_and_prints_the_breakdown() -> None:
    command = [sys.executable, "-m", "examples.pipeline", "--requests", "3", "--compute-ms", "5"]
    done = subprocess.run(
        command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    expected = [
        "starting rendezvous... ok",
        "starting orchestrator",
        "3 model services",
        "Key points:",
        "compute ms",
        "transport ms",
        "over 3 requests",
        "transport p50",
        "transport p90",
        "5 processes stopped cleanly",
    ]
    assert [text for text in expected if text not in out] == []
    for row in ("stt", "llm", "image", "chain", "end to end"):
        assert f"\n{row} " in out


def test_ctrl_c_stops_every_process_and_exits_130() -> None:
    command = [
        sys.executable,
        "-m",
        "examples.pipeline",
        "--requests",
        "100000",
        "--compute-ms",
        "5",
    ]
    runner = subprocess.Popen(
        command,
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(60, runner.kill)
    watchdog.start()
    try:
        assert runner.stdout is not None
        seen = ""
        for line in runner.stdout:
            seen += line
            if line.startswith("first request:"):
                break
        runner.send_signal(signal.SIGINT)  # what Ctrl-C sends to the runner alone
        out, err = runner.communicate()
    finally:
        watchdog.cancel()
    assert runner.returncode == 130, seen + out + err
    assert "5 processes stopped cleanly" in out
    pids = [int(pid) for pid in re.findall(r"\bpid (\d+)", seen)]
    assert len(pids) == 5
    assert [pid for pid in pids if _alive(pid)] == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
