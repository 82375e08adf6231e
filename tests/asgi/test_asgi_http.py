"""The ASGI bridge serving requests: scopes, bodies both ways, streaming, errors."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from _h2client import h2_connect, served, sha256
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from overlay_httpx import Address, PublicIdentity

pytestmark = pytest.mark.anyio

TEN_MIB = 10 * 1024 * 1024


def _payload(size: int) -> bytes:
    block = hashlib.sha256(b"overlay").digest() * 2048  # 64 KiB, not one repeating byte
    return (block * (size // len(block) + 1))[:size]


async def test_fastapi_json_post_round_trip() -> None:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any]) -> dict[str, Any]:
        return {"echo": body["prompt"], "n": len(body["prompt"])}

    async with served(app) as (server, client_node), h2_connect(client_node, server) as client:
        for prompt in ("hi", "again"):  # two requests on one connection
            response = await client.request(
                "POST",
                "/v1/completions",
                json.dumps({"prompt": prompt}).encode(),
                headers=[(b"content-type", b"application/json")],
            )
            assert response.status == 200
            assert response.header(b"content-type") == b"application/json"
            assert json.loads(response.body) == {"echo": prompt, "n": len(prompt)}


async def test_scope_contents_and_the_overlay_extension() -> None:
    scopes: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            scope["state"]["model"] = "tiny"
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            assert message["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.complete"})
            return
        scopes.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body"})

    async with (
        served(app, root_path="/api") as (server, client_node),
        h2_connect(client_node, server) as client,
    ):
        response = await client.request(
            "GET", "/caf%C3%A9/a%20b?x=1&y=%20", headers=[(b"x-Custom", b"Value")]
        )
        assert response.status == 204
    [scope] = scopes
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert scope["http_version"] == "2"
    assert scope["method"] == "GET"
    assert scope["scheme"] == "http"
    assert scope["root_path"] == "/api"
    assert scope["path"] == "/api/café/a b"
    assert scope["raw_path"] == b"/api/caf%C3%A9/a%20b"
    assert scope["query_string"] == b"x=1&y=%20"
    assert scope["headers"][0] == (b"host", b"test.overlay")  # from :authority
    assert (b"x-custom", b"Value") in scope["headers"]
    assert not any(name.startswith(b":") for name, _ in scope["headers"])
    assert scope["server"] == (str(server.node.address), 80)
    assert scope["client"] == (str(client_node.address), 0)
    assert scope["state"] == {"model": "tiny"}
    overlay = scope["extensions"]["overlay"]
    assert overlay["peer_address"] == client_node.address
    assert isinstance(overlay["peer_address"], Address)
    assert overlay["peer_identity"] == client_node.public
    assert isinstance(overlay["peer_identity"], PublicIdentity)
    assert overlay["path"] == "direct"


async def test_fastapi_sees_the_caller_identity() -> None:
    app = FastAPI()

    @app.get("/whoami")
    async def whoami(request: Request) -> dict[str, str]:
        overlay = request.scope["extensions"]["overlay"]
        return {"address": str(overlay["peer_address"]), "key": str(overlay["peer_identity"])}

    async with served(app) as (server, client_node), h2_connect(client_node, server) as client:
        response = await client.request("GET", "/whoami")
    assert json.loads(response.body) == {
        "address": str(client_node.address),
        "key": str(client_node.public),
    }


async def test_ten_mib_upload_and_download() -> None:
    data = _payload(TEN_MIB)
    app = FastAPI()

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, Any]:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
        return {"sha256": digest.hexdigest(), "size": size}

    @app.get("/download")
    async def download() -> Response:
        return Response(data, media_type="application/octet-stream")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(0, len(data), 1 << 20):
                yield data[offset : offset + (1 << 20)]

        return StreamingResponse(chunks())

    async with served(app) as (server, client_node), h2_connect(client_node, server) as client:
        up = await client.request("POST", "/upload", data)
        assert json.loads(up.body) == {"sha256": sha256(data), "size": TEN_MIB}
        for path in ("/download", "/stream"):
            down = await client.request("GET", path)
            assert down.status == 200
            assert sha256(down.body) == sha256(data)


async def test_a_slow_app_holds_the_uploader_back() -> None:
    """Request body bytes are acknowledged to the client only as the app reads them."""
    may_read = anyio.Event()
    received: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        await may_read.wait()
        while True:
            message = await receive()
            received.append(len(message["body"]))
            if not message["more_body"]:
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(sum(received)).encode()})

    async with (
        served(app, lifespan="off") as (server, client_node),
        h2_connect(client_node, server) as client,
    ):
        await client.ping()  # the server's SETTINGS are in
        window = client.server_settings[SettingCodes.INITIAL_WINDOW_SIZE]
        response = client.open("POST", "/slow", end_stream=False)
        sid = response.stream_id
        await client.send_body(sid, _payload(window), end_stream=False)
        await client.ping()  # the server has seen every byte of it
        assert client.h2.local_flow_control_window(sid) == 0  # and granted nothing more
        may_read.set()
        await client.send_body(sid, _payload(window))  # flows once the app reads
        await response.wait_end()
        assert response.body == str(2 * window).encode()


async def test_streaming_response_arrives_before_the_generator_finishes() -> None:
    release = anyio.Event()
    app = FastAPI()

    @app.get("/events")
    async def events() -> StreamingResponse:
        async def generate() -> AsyncIterator[str]:
            yield "data: first\n\n"
            await release.wait()
            yield "data: second\n\n"

        return StreamingResponse(generate(), media_type="text/event-stream")

    async with served(app) as (server, client_node), h2_connect(client_node, server) as client:
        response = client.open("GET", "/events")
        await client.flush()
        assert await response.next_chunk() == b"data: first\n\n"
        assert response.status == 200
        assert not response.ended
        release.set()
        assert await response.next_chunk() == b"data: second\n\n"
        await response.wait_end()
        assert response.ended


@pytest.mark.parametrize("between_chunks", ["busy", "blocked"])
async def test_client_reset_stops_the_generator(between_chunks: str) -> None:
    stopped = anyio.Event()
    app = FastAPI()

    @app.get("/forever")
    async def forever() -> StreamingResponse:
        async def generate() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"tick " * 100
                    if between_chunks == "busy":
                        await anyio.sleep(0.001)
                    else:
                        await anyio.sleep_forever()
            finally:
                stopped.set()

        return StreamingResponse(generate())

    async with served(app) as (server, client_node), h2_connect(client_node, server) as client:
        await client.cancel_after_first_chunk("/forever")
        with anyio.fail_after(1):
            await stopped.wait()
        # the connection carries on
        assert (await client.request("GET", "/nothing-here")).status == 404


async def test_app_exception_is_a_500_and_the_next_request_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FastAPI()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    with caplog.at_level(logging.ERROR, logger="overlay_httpx"):
        async with served(app) as (server, client_node), h2_connect(client_node, server) as c:
            failed = await c.request("GET", "/boom")
            assert failed.status == 500
            assert failed.body == b"Internal Server Error"
            assert (await c.request("GET", "/ok")).status == 200
    assert any("kaput" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


async def test_app_exception_after_the_response_started_resets_the_stream() -> None:
    app = FastAPI()

    @app.get("/half")
    async def half() -> StreamingResponse:
        async def generate() -> AsyncIterator[bytes]:
            yield b"part one"
            raise RuntimeError("the model crashed")

        return StreamingResponse(generate())

    async with served(app) as (server, client_node), h2_connect(client_node, server) as client:
        response = await client.request("GET", "/half")
        assert response.status == 200
        assert response.body == b"part one"
        assert response.reset_code == ErrorCodes.INTERNAL_ERROR
        assert (await client.request("GET", "/missing")).status == 404


async def test_bad_request_headers_get_400_and_the_connection_carries_on() -> None:
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    async with (
        served(app, max_header_list_size=4096) as (server, client_node),
        h2_connect(client_node, server, validate=False) as client,
    ):
        bad = [
            ("GET", "/ok", [(b"X-Upper", b"case")]),
            ("GET", "/ok", [(b"connection", b"keep-alive")]),
            ("GET", "/ok", [(b"x-space", b" padded")]),
            ("GET", "no-slash", []),
            ("GET", "/ok", [(b"te", b"gzip")]),
        ]
        for method, path, headers in bad:
            response = await client.request(method, path, headers=headers)
            assert response.status == 400, (path, headers)
        too_big = await client.request("GET", "/ok", headers=[(b"x-big", b"a" * 5000)])
        assert too_big.status == 431
        assert client.server_settings[SettingCodes.MAX_HEADER_LIST_SIZE] == 4096
        assert (await client.request("GET", "/ok")).status == 200
        assert client.goaway is None


async def test_a_hundred_and_more_concurrent_requests_on_one_connection() -> None:
    count = 150
    arrived = 0
    everyone_in = anyio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal arrived
        if scope["type"] != "http":
            raise RuntimeError("no lifespan here")
        message = await receive()
        arrived += 1
        if arrived == count:
            everyone_in.set()
        await everyone_in.wait()  # every request is in the app at once
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": message["body"][::-1]})

    async with (
        served(app, max_concurrent_streams=200) as (server, client_node),
        h2_connect(client_node, server) as client,
    ):
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            response = await client.request("POST", "/", f"request {i}".encode())
            assert response.status == 200
            results[i] = response.body

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(one, i)
    assert results == {i: f"request {i}".encode()[::-1] for i in range(count)}


async def test_send_raises_for_an_app_that_does_not_listen() -> None:
    """An app that never calls receive() learns of the reset from send() (an OSError)."""
    stopped = anyio.Event()
    errors: list[BaseException] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"x" * 1000, "more_body": True})
                await anyio.sleep(0.001)
        except OSError as exc:
            errors.append(exc)
        finally:
            stopped.set()

    async with (
        served(app, lifespan="off") as (server, client_node),
        h2_connect(client_node, server) as client,
    ):
        await client.cancel_after_first_chunk("/")
        with anyio.fail_after(1):
            await stopped.wait()
    assert len(errors) == 1


async def test_head_responses_carry_no_body() -> None:
    app = FastAPI()

    @app.api_route("/doc", methods=["GET", "HEAD"])
    async def doc() -> Response:
        return Response(b"the document", media_type="text/plain")

    async with served(app) as (server, client_node), h2_connect(client_node, server) as client:
        head = await client.request("HEAD", "/doc")
        assert (head.status, head.body, head.header(b"content-length")) == (200, b"", b"12")
        assert (await client.request("GET", "/doc")).body == b"the document"


@pytest.mark.parametrize(
    ("declared", "chunks", "expect"),
    [
        (b"3", [b"12345"], "500"),  # longer than declared, before anything was sent
        (b"10", [b"12345"], "500"),  # shorter, ended before anything was sent
        (b"10", [b"12345", b"", b"6"], "reset"),  # shorter, after the headers went out
    ],
)
async def test_a_wrong_content_length_fails_that_response_only(
    declared: bytes, chunks: list[bytes], expect: str
) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        headers = [(b"content-length", declared)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i, chunk in enumerate(chunks):
            more = i < len(chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

    async with (
        served(app, lifespan="off") as (server, client_node),
        h2_connect(client_node, server) as client,
    ):
        response = await client.request("GET", "/")
        if expect == "500":
            assert response.status == 500
        else:
            assert response.reset_code == ErrorCodes.INTERNAL_ERROR
        await client.ping()  # the connection lives on
        assert client.goaway is None


async def test_headers_wait_for_the_body_unless_pushed_with_an_empty_chunk() -> None:
    """Headers go out with the first body message; an empty one with more_body sends them."""
    release = anyio.Event()
    after_response: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        assert (await receive())["type"] == "http.request"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b"done"})
        after_response.append((await receive())["type"])

    async with (
        served(app, lifespan="off") as (server, client_node),
        h2_connect(client_node, server) as client,
    ):
        response = client.open("GET", "/")
        await client.flush()
        await response.wait_headers()
        assert response.status == 200
        assert not response.chunks
        release.set()
        await response.wait_end()
        assert response.body == b"done"
        await client.ping()
    assert after_response == ["http.disconnect"]  # receive() after the response completed


async def test_a_body_over_max_body_size_gets_413_and_the_connection_carries_on() -> None:
    app = FastAPI()
    seen: list[int] = []

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        seen.append(size)
        return {"size": size}

    async with (
        served(app, max_body_size=1000) as (server, client_node),
        h2_connect(client_node, server) as client,
    ):
        declared = await client.request(
            "POST", "/upload", b"x" * 2000, [(b"content-length", b"2000")]
        )
        assert declared.status == 413  # refused from the headers alone
        streamed = client.open("POST", "/upload", [], end_stream=False)
        await client.send_body(streamed.stream_id, b"y" * 5000)
        await streamed.wait_end()
        assert streamed.status == 413  # refused once the data went over
        small = await client.request("POST", "/upload", b"z" * 999)
        assert small.status == 200
        assert json.loads(b"".join(small.chunks)) == {"size": 999}
        assert seen == [999]  # the app never saw an oversized body complete
