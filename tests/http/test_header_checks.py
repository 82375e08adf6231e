"""The client's own HTTP/2 header checks (h2's are switched off for speed).

Requests: names lowercased, values trimmed, credentials never indexed by HPACK,
and a field HTTP/2 cannot carry is the caller's error before anything is sent.
Responses: a header block RFC 9113 does not allow fails its own request, with
RST_STREAM(PROTOCOL_ERROR), and the connection carries on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import anyio
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import httpx
import pytest
from fastapi import FastAPI, Request
from hpack import NeverIndexedHeaderTuple

from overlay_httpx import OverlayTransport
from overlay_httpx._http._client import _head, _request_fields
from overlay_httpx._http._errors import MalformedResponse

pytestmark = pytest.mark.anyio

# Response header blocks a raw server sends for GET /bad, and why each is malformed.
MALFORMED = {
    "uppercase name": [(b":status", b"200"), (b"X-Upper", b"1")],
    "no status": [(b"content-type", b"text/plain")],
    "pseudo-header after a field": [(b"content-type", b"text/plain"), (b":status", b"200")],
    "two statuses": [(b":status", b"200"), (b":status", b"204")],
    "request pseudo-header": [(b":status", b"200"), (b":path", b"/")],
    "connection-specific field": [(b":status", b"200"), (b"connection", b"close")],
    "value with trailing space": [(b":status", b"200"), (b"x-pad", b"1 ")],
    "status not three digits": [(b":status", b"20")],
}


Answer = Callable[[h2.connection.H2Connection, int, bytes], None]


async def _serve_raw(
    stream: Any,
    answer: Answer,
    on_reset: Callable[[int], None] | None = None,
    *,
    after_goaway: bool = False,
) -> None:
    """An HTTP/2 server that checks nothing: `answer(conn, stream_id, path)` once a
    request has ended, `on_reset(error_code)` for each RST_STREAM it receives. With
    `after_goaway`, the h2 errors that frames arriving after its GOAWAY raise end it
    quietly."""
    config = h2.config.H2Configuration(
        client_side=False, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    await stream.send(conn.data_to_send())
    paths: dict[int, bytes] = {}
    done: tuple[type[Exception], ...] = (anyio.BrokenResourceError, anyio.EndOfStream)
    if after_goaway:
        done += (h2.exceptions.ProtocolError,)
    with contextlib.suppress(*done):
        async for data in stream:
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    assert event.stream_id is not None
                    assert event.headers is not None
                    paths[event.stream_id] = dict(event.headers)[b":path"]
                elif isinstance(event, h2.events.StreamEnded):
                    assert event.stream_id is not None
                    answer(conn, event.stream_id, paths[event.stream_id])
                elif isinstance(event, h2.events.StreamReset) and on_reset is not None:
                    on_reset(event.error_code)
            await stream.send(conn.data_to_send())


async def _raw_server(
    stream: Any, bad_head: list[tuple[bytes, bytes]], resets: list[int], conns: list[int]
) -> None:
    """/bad and /bad-ended get `bad_head`, anything else 200 "ok"."""
    conns.append(1)

    def answer(conn: h2.connection.H2Connection, sid: int, path: bytes) -> None:
        if path == b"/bad":  # left open: the client resets it
            conn.send_headers(sid, bad_head)
        elif path == b"/bad-ended":  # ended: nothing left to reset
            conn.send_headers(sid, bad_head, end_stream=True)
        else:
            conn.send_headers(sid, [(b":status", b"200")])
            conn.send_data(sid, b"ok", end_stream=True)

    await _serve_raw(stream, answer, resets.append)


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_a_malformed_response_fails_its_request_and_the_connection_carries_on(
    case: str,
    overlay_node_factory,  # type: ignore[no-untyped-def]
) -> None:
    server_node, client_node = await overlay_node_factory(), await overlay_node_factory()
    listener = await server_node.listen(80)
    resets: list[int] = []
    conns: list[int] = []

    async def handle(stream: Any) -> None:
        await _raw_server(stream, MALFORMED[case], resets, conns)

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        base = f"http://{server_node.address.host}"
        async with httpx.AsyncClient(transport=OverlayTransport(client_node)) as client:
            with pytest.raises(httpx.RemoteProtocolError, match="malformed response"):
                await client.get(f"{base}/bad")
            with pytest.raises(httpx.RemoteProtocolError, match="malformed response"):
                await client.get(f"{base}/bad-ended")
            r = await client.get(f"{base}/good")
            assert (r.status_code, r.text) == (200, "ok")
            await anyio.wait_all_tasks_blocked()  # the server has read our RST_STREAM
        tg.cancel_scope.cancel()
    assert resets == [h2.errors.ErrorCodes.PROTOCOL_ERROR]
    assert conns == [1]  # both requests on one connection


def _echo_app() -> FastAPI:
    app = FastAPI()

    @app.get("/headers")
    async def headers(request: Request) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in request.scope["headers"]}

    return app


@pytest.mark.parametrize(
    ("name", "value", "complaint"),
    [
        ("x-split", "a\r\nx-injected: 1", "NUL, CR or LF"),
        ("x-nul", "a\x00b", "NUL, CR or LF"),
        ("bad name", "1", "expected a token"),
        ("x-colon:", "1", "expected a token"),
    ],
)
async def test_a_request_header_http2_cannot_carry_is_a_local_protocol_error(
    name: str,
    value: str,
    complaint: str,
    overlay_app_client,  # type: ignore[no-untyped-def]
) -> None:
    client = await overlay_app_client(_echo_app())
    with pytest.raises(httpx.LocalProtocolError, match=complaint):
        await client.get("/headers", headers={name: value})
    r = await client.get("/headers")  # nothing was sent: the connection is fine
    assert r.status_code == 200
    assert "x-injected" not in r.json()


async def test_request_headers_arrive_lowercased_and_trimmed(
    overlay_app_client,  # type: ignore[no-untyped-def]
) -> None:
    client = await overlay_app_client(_echo_app())
    r = await client.get("/headers", headers={"X-Padded": "  some value\t", "TE": "trailers"})
    seen = r.json()
    assert seen["x-padded"] == "some value"
    assert seen["te"] == "trailers"
    r = await client.get("/headers", headers={"TE": "gzip", "Connection": "close"})
    assert "te" not in r.json()
    assert "connection" not in r.json()


def test_credentials_are_marked_never_indexed() -> None:
    fields = _request_fields(
        [
            (b"Authorization", b"Bearer secret"),
            (b"Proxy-Authorization", b"Basic abc"),
            (b"Cookie", b"short=1"),
            (b"cookie", b"long=" + b"x" * 30),
            (b"accept", b"*/*"),
        ]
    )
    never = [type(f) is NeverIndexedHeaderTuple for f in fields]
    assert never == [True, True, True, False, False]
    assert fields[0] == (b"authorization", b"Bearer secret")


async def test_credentials_reach_the_wire_as_never_indexed_fields(
    overlay_node_factory,  # type: ignore[no-untyped-def]
) -> None:
    """What the server's HPACK decoder reads: a never-indexed field, sent twice as such
    (an indexed one would come back from its dynamic table the second time)."""
    server_node, client_node = await overlay_node_factory(), await overlay_node_factory()
    listener = await server_node.listen(80)
    seen: list[Any] = []

    async def handle(stream: Any) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        await stream.send(conn.data_to_send())
        with contextlib.suppress(anyio.BrokenResourceError, anyio.EndOfStream):
            async for data in stream:
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        assert event.headers is not None
                        assert event.stream_id is not None
                        seen.extend(h for h in event.headers if h[0] == b"authorization")
                        conn.send_headers(event.stream_id, [(b":status", b"204")], True)
                await stream.send(conn.data_to_send())

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        async with httpx.AsyncClient(transport=OverlayTransport(client_node)) as client:
            for _ in range(2):
                r = await client.get(
                    f"http://{server_node.address.host}/", headers={"authorization": "Bearer s"}
                )
                assert r.status_code == 204
        tg.cancel_scope.cancel()
    assert seen == [(b"authorization", b"Bearer s")] * 2
    assert all(type(h) is NeverIndexedHeaderTuple for h in seen)


async def test_the_reset_of_a_malformed_response_leaves_at_once(
    overlay_node_factory,  # type: ignore[no-untyped-def]
) -> None:
    """The server learns that its malformed response was refused without waiting for
    the client's next request (it would go on producing the body meanwhile)."""
    server_node, client_node = await overlay_node_factory(), await overlay_node_factory()
    listener = await server_node.listen(80)
    reset = anyio.Event()
    codes: list[int] = []

    def answer(conn: h2.connection.H2Connection, sid: int, path: bytes) -> None:
        conn.send_headers(sid, [(b":status", b"200"), (b"X-A", b"1")])
        conn.send_data(sid, b"more to come")

    def on_reset(code: int) -> None:
        codes.append(code)
        reset.set()

    async def handle(stream: Any) -> None:
        await _serve_raw(stream, answer, on_reset)

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        async with httpx.AsyncClient(transport=OverlayTransport(client_node)) as client:
            with pytest.raises(httpx.RemoteProtocolError, match="malformed response"):
                await client.get(f"http://{server_node.address.host}/")
            with anyio.fail_after(5):  # the client sends nothing else meanwhile
                await reset.wait()
        tg.cancel_scope.cancel()
    assert codes == [h2.errors.ErrorCodes.PROTOCOL_ERROR]


async def test_a_malformed_response_read_with_a_goaway_fails_only_its_own_request(
    overlay_node_factory,  # type: ignore[no-untyped-def]
) -> None:
    """One read holds a malformed response, a good one for another request and a
    graceful GOAWAY (h2 has closed its side when the events are handled): the good
    response is delivered, the malformed one fails at once, and the next request
    goes to a new connection."""
    server_node, client_node = await overlay_node_factory(), await overlay_node_factory()
    listener = await server_node.listen(80)
    slow_seen = anyio.Event()
    conns: list[int] = []

    slow: list[int] = []

    def answer(conn: h2.connection.H2Connection, sid: int, path: bytes) -> None:
        if path == b"/slow":
            slow.append(sid)  # answered with /bad, in the same read
            slow_seen.set()
        elif path == b"/bad":
            conn.send_headers(sid, [(b":status", b"200"), (b"X-A", b"1")])
            for other in slow:
                conn.send_headers(other, [(b":status", b"200")], end_stream=True)
            conn.close_connection(last_stream_id=sid)
        else:
            conn.send_headers(sid, [(b":status", b"204")], end_stream=True)

    async def handle(stream: Any) -> None:
        conns.append(1)
        await _serve_raw(stream, answer, after_goaway=True)

    base = f"http://{server_node.address.host}"
    results: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        async with httpx.AsyncClient(transport=OverlayTransport(client_node)) as client:

            async def get(path: str) -> None:
                try:
                    results[path] = (await client.get(f"{base}{path}")).status_code
                except httpx.HTTPError as exc:
                    results[path] = exc

            with anyio.fail_after(5):  # a stranded waiter would sit out its read timeout
                async with anyio.create_task_group() as requests:
                    requests.start_soon(get, "/slow")
                    await slow_seen.wait()
                    requests.start_soon(get, "/bad")
            assert results["/slow"] == 200
            assert isinstance(results["/bad"], httpx.RemoteProtocolError)
            assert "malformed response" in str(results["/bad"])
            assert (await client.get(f"{base}/next")).status_code == 204
        tg.cancel_scope.cancel()
    assert conns == [1, 1]  # after the GOAWAY, a new connection


def test_response_names_follow_rfc_9113_not_the_stricter_token_rule() -> None:
    """What a peer may send (RFC 9113 section 8.2.1) is taken; what it may not, is not."""
    head = _head([(b":status", b"200"), (b"x@y", b"1"), (b"x-a", b"")])
    assert (head.status, head.headers) == (200, [(b"x@y", b"1"), (b"x-a", b"")])
    for name in (b"x:y", b"X-A", b"x y", b""):
        with pytest.raises(MalformedResponse):
            _head([(b":status", b"200"), (name, b"1")])
