from __future__ import annotations

import contextlib
import json
import struct

import pytest
from _fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from overlay_httpx._exceptions import RegistryProtocolError
from overlay_httpx._rendezvous._messages import (
    MAX_DEPTH,
    MAX_ID,
    MAX_MESSAGE,
    OPS,
    MessageDecoder,
    Push,
    Request,
    Response,
    arg_list_of_str,
    arg_str,
    describe,
    encode,
    error,
    ok,
    parse_message,
    push,
    request,
)

FUZZ = fuzz_settings(200)


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def decode_one(data: bytes) -> dict[str, object]:
    (obj,) = MessageDecoder().feed(data)
    return obj


# -- framing -------------------------------------------------------------------------------


def test_encode_is_compact_length_prefixed_json() -> None:
    data = encode({"id": 1, "op": "lookup", "args": {"address": "1:0001.0001.0001"}})
    payload = b'{"id":1,"op":"lookup","args":{"address":"1:0001.0001.0001"}}'
    assert data == frame(payload)


def test_encode_keeps_unicode_as_utf8() -> None:
    assert encode({"x": "é"}) == frame('{"x":"é"}'.encode())


@pytest.mark.parametrize(
    "message",
    [
        request(0, "register", address="1:0001.0001.0001", tags=["gpu"], hostname=None),
        ok(MAX_ID, {"records": [{"a": 1.5, "b": [True, False, None]}]}),
        ok(3, None),
        error(4, "not_registered", "no live record for 1:0001.0001.0001"),
        push("punch", {"peer": {"address": "1:0001.0001.0002"}}),
    ],
)
def test_round_trip(message: dict[str, object]) -> None:
    assert decode_one(encode(message)) == message


def test_split_feeds_byte_by_byte() -> None:
    messages = [request(i, "heartbeat", n=i, text="ü" * i) for i in range(5)]
    data = b"".join(encode(m) for m in messages)
    decoder = MessageDecoder()
    out: list[dict[str, object]] = []
    for i in range(len(data)):
        out.extend(decoder.feed(data[i : i + 1]))
        assert decoder.buffered < len(data)
    assert out == messages
    assert decoder.buffered == 0


def test_several_frames_in_one_feed_and_a_partial_tail() -> None:
    a, b, c = ok(1, "a"), ok(2, "b"), ok(3, "c")
    wire = encode(a) + encode(b) + encode(c)
    decoder = MessageDecoder()
    assert decoder.feed(wire[:-3]) == [a, b]
    assert decoder.buffered == len(encode(c)) - 3
    assert decoder.feed(wire[-3:]) == [c]
    assert decoder.feed(b"") == []


def test_largest_message_is_accepted() -> None:
    base = len(json.dumps({"x": ""}, separators=(",", ":")))
    message = {"x": "a" * (MAX_MESSAGE - base)}
    assert decode_one(encode(message)) == message
    with pytest.raises(ValueError, match="over the 65536 limit"):
        encode({"x": "a" * (MAX_MESSAGE - base + 1)})


def test_oversize_length_and_sticky_failure() -> None:
    decoder = MessageDecoder()
    with pytest.raises(RegistryProtocolError, match="length 65537 exceeds") as ei:
        decoder.feed(struct.pack(">I", MAX_MESSAGE + 1))
    assert ei.value.code == "bad_request"
    assert decoder.failed
    with pytest.raises(RegistryProtocolError, match="length 65537 exceeds"):
        decoder.feed(encode(ok(1, None)))
    with pytest.raises(RegistryProtocolError):
        decoder.feed(b"")


def test_oversize_length_is_refused_before_the_body_arrives() -> None:
    with pytest.raises(RegistryProtocolError, match="exceeds"):
        MessageDecoder().feed(b"\xff\xff\xff\xff")


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b'{"x":"\xff"}', "not valid UTF-8"),
        (b'{"x":"\xed\xa0\x80"}', "not valid UTF-8"),  # an encoded surrogate
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b'{"a":1}x', "not valid JSON"),
        (b"{'a':1}", "not valid JSON"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),  # a BOM
        (b"[1,2]", "expected a JSON object at the top level, got a list of 2 items"),
        (b'"x"', "expected a JSON object at the top level, got 'x'"),
        (b"null", "got None"),
        (b"12", "got 12"),
        (b'{"a":NaN}', "NaN is not valid JSON"),
        (b'{"a":-Infinity}', "-Infinity is not valid JSON"),
        (b'{"a":1,"a":2}', "duplicate key 'a'"),
        (b'{"a":"\\ud800"}', "lone surrogate"),
        (b'{"\\udfff":1}', "lone surrogate"),
        (b'{"a":' + b"1" * 5000 + b"}", "integer string conversion"),
        (b'{"a":' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}", "nested deeper than 32"),
        (b'{"a":' + b"[" * 30000 + b"]" * 30000 + b"}", "nested deeper than 32"),
    ],
)
def test_bad_payloads(payload: bytes, match: str) -> None:
    decoder = MessageDecoder()
    with pytest.raises(RegistryProtocolError, match=match) as ei:
        decoder.feed(frame(payload))
    assert "\n" not in str(ei.value)
    with pytest.raises(RegistryProtocolError, match=match):
        decoder.feed(b"")


def test_deepest_allowed_nesting() -> None:
    inner: object = 1
    for _ in range(MAX_DEPTH - 1):
        inner = [inner]
    message = {"a": inner}
    assert decode_one(encode(message)) == message
    with pytest.raises(ValueError, match="nested deeper"):
        encode({"a": [inner]})


@pytest.mark.parametrize(
    "message",
    [
        {"x": float("nan")},
        {"x": object()},
        {"x": b"bytes"},
        {"x": "\ud800"},
        {1: "non-string key"},
    ],
)
def test_encode_refuses_what_cannot_be_decoded(message: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        encode(message)


# -- parse_message ---------------------------------------------------------------------------


def test_parse_shapes() -> None:
    assert parse_message(request(7, "lookup", address="x")) == Request(
        7, "lookup", {"address": "x"}
    )
    assert parse_message(ok(7, [1, 2])) == Response(7, [1, 2], None)
    assert parse_message(ok(7, None)) == Response(7, None, None)
    assert parse_message(error(7, "address_taken", "nope")) == Response(
        7, None, ("address_taken", "nope")
    )
    assert parse_message(push("punch", {"a": 1})) == Push("punch", {"a": 1})


def test_unknown_op_lists_the_known_ones() -> None:
    with pytest.raises(RegistryProtocolError, match="unknown op 'fly'") as ei:
        parse_message({"id": 1, "op": "fly", "args": {}})
    for op in OPS:
        assert op in str(ei.value)


@pytest.mark.parametrize(
    "bad_id", [True, False, -1, MAX_ID + 1, 1.0, "1", None, [1], {"id": 1}, 10**400]
)
def test_bad_ids(bad_id: object) -> None:
    for obj in (
        {"id": bad_id, "op": "lookup", "args": {}},
        {"id": bad_id, "result": 1},
        {"id": bad_id, "error": {"code": "x", "message": "y"}},
    ):
        with pytest.raises(RegistryProtocolError, match="'id': expected an integer") as ei:
            parse_message(obj)
        assert "\n" not in str(ei.value)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({}, "expected a request"),
        ({"foo": 1}, "keys were 'foo'"),
        ({"op": "lookup", "args": {}}, "'id': expected an integer 0..2\\*\\*53-1, missing"),
        ({"id": 1, "op": 5, "args": {}}, "'op': expected a string, got 5"),
        ({"id": 1, "op": "lookup"}, "'args': expected an object, got None"),
        ({"id": 1, "op": "lookup", "args": []}, "'args': expected an object"),
        ({"id": 1, "op": "lookup", "args": {}, "x": 1}, "unexpected key 'x'"),
        ({"result": 1}, "'id': expected an integer 0..2\\*\\*53-1, missing"),
        ({"id": 1, "result": 1, "error": {}}, "both 'result' and 'error'"),
        ({"id": 1, "result": 1, "extra": 0}, "unexpected key 'extra'"),
        ({"id": 1, "error": "boom"}, "'error': expected an object"),
        ({"id": 1, "error": {"code": "x"}}, "'error.message': expected a string"),
        ({"id": 1, "error": {"message": "x"}}, "'error.code': expected a non-empty string"),
        ({"id": 1, "error": {"code": "", "message": "x"}}, "'error.code'"),
        ({"id": 1, "error": {"code": "x", "message": "y", "z": 1}}, "unexpected key 'z'"),
        ({"push": "", "data": {}}, "'push': expected a non-empty string"),
        ({"push": 1, "data": {}}, "'push': expected a non-empty string"),
        ({"push": "punch"}, "'data': expected an object"),
        ({"push": "punch", "data": {}, "id": 1}, "unexpected key 'id'"),
    ],
)
def test_bad_shapes(obj: dict[str, object], match: str) -> None:
    with pytest.raises(RegistryProtocolError, match=match) as ei:
        parse_message(obj)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("obj", [None, [], "x", 1, b"{}"])
def test_parse_message_of_a_non_object(obj: object) -> None:
    with pytest.raises(RegistryProtocolError, match="expected a JSON object"):
        parse_message(obj)  # type: ignore[arg-type]


def test_builders_refuse_local_mistakes() -> None:
    with pytest.raises(ValueError, match="unknown op"):
        request(1, "fly")
    with pytest.raises(ValueError, match="message id"):
        request(-1, "lookup")
    with pytest.raises(ValueError, match="message id"):
        ok(True, None)
    with pytest.raises(ValueError, match="code and message"):
        error(1, "", "x")
    with pytest.raises(ValueError, match="push name"):
        push("", {})


# -- argument accessors ------------------------------------------------------------------------


def test_arg_str() -> None:
    req = Request(1, "lookup", {"address": "1:0001.0001.0001", "n": 5, "none": None})
    assert arg_str(req, "address") == "1:0001.0001.0001"
    assert arg_str(req, "missing", optional=True) is None
    assert arg_str(req, "none", optional=True) is None
    with pytest.raises(RegistryProtocolError, match=r"^'missing': expected a string, missing$"):
        arg_str(req, "missing")
    with pytest.raises(RegistryProtocolError, match=r"^'n': expected a string, got 5$"):
        arg_str(req, "n")
    with pytest.raises(RegistryProtocolError, match=r"^'n': expected a string, got 5$"):
        arg_str(req, "n", optional=True)
    with pytest.raises(RegistryProtocolError, match=r"^'none': expected a string, got None$"):
        arg_str(req, "none")


def test_arg_list_of_str() -> None:
    req = Request(1, "set_tags", {"tags": ["a", "b"], "bad": ["a", 1], "s": "ab"})
    assert arg_list_of_str(req, "tags", max_items=2) == ["a", "b"]
    with pytest.raises(RegistryProtocolError, match=r"^'tags': expected a list of at most 1"):
        arg_list_of_str(req, "tags", max_items=1)
    with pytest.raises(RegistryProtocolError, match=r"'bad': expected a list of strings, got .* 1"):
        arg_list_of_str(req, "bad", max_items=5)
    with pytest.raises(RegistryProtocolError, match=r"'s': expected a list .* got 'ab'"):
        arg_list_of_str(req, "s", max_items=5)
    with pytest.raises(RegistryProtocolError, match=r"'nope': expected a list .* missing"):
        arg_list_of_str(req, "nope", max_items=5)


def test_describe_is_short_and_safe() -> None:
    assert describe("x" * 100) == repr("x" * 37 + "...")
    assert describe(10**5000).startswith("an integer of ~")
    assert describe([[[]]]) == "a list of 1 items"
    assert describe({"a": 1}) == "an object with 1 keys"
    assert describe(object()) == "a object"
    assert "\n" not in describe("a\nb")


# -- fuzzing -------------------------------------------------------------------------------------


@pytest.mark.fuzz
@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_decoder_raises_only_protocol_errors(chunks: list[bytes]) -> None:
    decoder = MessageDecoder()
    for chunk in chunks:
        try:
            objs = decoder.feed(chunk)
        except RegistryProtocolError:
            return
        for obj in objs:
            with contextlib.suppress(RegistryProtocolError):
                parse_message(obj)


@pytest.mark.fuzz
@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_framed_garbage(payload: bytes) -> None:
    try:
        objs = MessageDecoder().feed(frame(payload))
    except RegistryProtocolError:
        return
    for obj in objs:
        with contextlib.suppress(RegistryProtocolError):
            parse_message(obj)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)
arg_objects = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k not in ("id", "op")), json_values, max_size=5
)
ids = st.integers(min_value=0, max_value=MAX_ID)


@pytest.mark.fuzz
@FUZZ
@given(
    st.lists(
        st.one_of(
            st.builds(
                lambda i, op, a: request(i, op, **a), ids, st.sampled_from(sorted(OPS)), arg_objects
            ),
            st.builds(ok, ids, json_values),
            st.builds(error, ids, st.text(min_size=1, max_size=20), st.text(max_size=40)),
            st.builds(push, st.text(min_size=1, max_size=20), json_objects),
        ),
        min_size=1,
        max_size=4,
    ),
    st.data(),
)
def test_fuzz_round_trip(messages: list[dict[str, object]], data: st.DataObject) -> None:
    wire = b"".join(encode(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    decoder = MessageDecoder()
    out: list[dict[str, object]] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        out.extend(decoder.feed(wire[start:end]))
    assert out == messages
    for obj in out:
        parsed = parse_message(obj)
        if isinstance(parsed, Request):
            assert request(parsed.id, parsed.op, **parsed.args) == obj
        elif isinstance(parsed, Response):
            if parsed.error is None:
                assert ok(parsed.id, parsed.result) == obj
            else:
                assert error(parsed.id, *parsed.error) == obj
        else:
            assert push(parsed.name, parsed.data) == obj


@pytest.mark.fuzz
@FUZZ
@given(json_values)
def test_fuzz_parse_message_on_any_json(value: object) -> None:
    for obj in (
        value,
        {"id": value, "op": "lookup", "args": value},
        {"push": value, "data": value},
        {"id": 1, "error": value},
        {"id": value, "result": value},
    ):
        try:
            parse_message(obj)  # type: ignore[arg-type]
        except RegistryProtocolError as exc:
            message = str(exc)
        else:
            continue
        assert "\n" not in message
