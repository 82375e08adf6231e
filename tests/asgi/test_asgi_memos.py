"""The per-connection memos of parsed request headers and checked response heads."""

from __future__ import annotations

from typing import Any

import pytest

from overlay_httpx import Address, Identity
from overlay_httpx._asgi._request import ResponseHeads
from overlay_httpx._asgi._scope import BadRequest, ConnectionInfo, ScopeBuilder, build_scope

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"a.overlay"),
    (b":path", b"/v1/echo%20x?q=1"),
    (b"content-type", b"application/json"),
]


def _info(paths: list[str], state: dict[str, Any] | None = None) -> ConnectionInfo:
    identity = Identity.generate().public
    return ConnectionInfo(
        server=("1-0001-0001-0001", 80),
        client=("1-0001-0002-0002", 0),
        root_path="/root",
        peer_address=Address.from_host("1-0001-0002-0002.overlay"),
        peer_identity=identity,
        path=lambda: paths[-1],
        max_header_list_size=16 << 10,
        max_body_size=None,
        state=state,
    )


def test_remembered_scopes_are_new_and_equal_to_built_ones() -> None:
    paths = ["direct"]
    info = _info(paths, state={"db": 1})
    builder = ScopeBuilder(info)
    first = builder.build(list(REQUEST))
    assert first == build_scope(REQUEST, info)
    first["headers"].append((b"x-added", b"by the app"))
    first["state"]["db"] = 2
    first["asgi"]["version"] = "changed"
    paths.append("relayed")
    second = builder.build(list(REQUEST))
    assert second == build_scope(REQUEST, info)
    assert second["headers"] == [(b"host", b"a.overlay"), (b"content-type", b"application/json")]
    assert second["state"] == {"db": 1}
    assert second["extensions"]["overlay"]["path"] == "relayed"
    assert second["path"] == "/root/v1/echo x"
    assert second["query_string"] == b"q=1"


def test_bad_requests_are_never_remembered() -> None:
    builder = ScopeBuilder(_info(["direct"]))
    bad = [*REQUEST, (b"connection", b"close")]
    for _ in range(2):
        with pytest.raises(BadRequest):
            builder.build(bad)
    assert builder._parsed == {}


def test_scope_memo_is_bounded() -> None:
    builder = ScopeBuilder(_info(["direct"]))
    for i in range(100):
        builder.build([*REQUEST, (b"x-n", str(i).encode())])
    assert len(builder._parsed) <= ScopeBuilder.MAX_REMEMBERED


def test_remembered_response_heads() -> None:
    heads = ResponseHeads()
    message = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"Content-Type", b"text/plain "), (b"content-length", b"5")],
    }
    first = heads.get(message)
    assert first == (
        200,
        [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"5")],
        5,
    )
    first[1].append((b"x", b"y"))
    assert heads.get(message) == (200, first[1][:-1], 5)
    assert len(heads._heads) == 1


def test_response_heads_that_only_look_like_remembered_ones_are_still_checked() -> None:
    heads = ResponseHeads()
    good: dict[str, Any] = {"status": 200, "headers": [(b"content-type", b"text/plain")]}
    heads.get(good)
    with pytest.raises(ValueError, match="status"):
        heads.get({**good, "status": 200.0})  # equal to 200, and hashes alike
    with pytest.raises(TypeError, match="expected bytes"):
        heads.get({"status": 200, "headers": [(memoryview(b"content-type"), b"text/plain")]})
    for _ in range(2):
        with pytest.raises(ValueError, match="invalid"):
            heads.get({"status": 200, "headers": [(b"bad name", b"x")]})
    assert len(heads._heads) == 1
