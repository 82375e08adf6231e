"""The registry wire format: length-prefixed JSON messages between nodes and the rendezvous.

The registry protocol runs over an ordinary reliable overlay byte stream, so
all it needs is framing and a small, explicit message vocabulary. A frame is a
4-byte big-endian length followed by that many bytes of UTF-8 JSON whose top
level is an object (at most `MAX_MESSAGE` bytes). Three shapes exist::

    request   {"id": 7, "op": "lookup", "args": {"address": "1:0001.0001.0001"}}
    success   {"id": 7, "result": <any JSON>}
    failure   {"id": 7, "error": {"code": "not_registered", "message": "..."}}
    push      {"push": "connect", "data": {...}}

JSON is deliberate: the messages are small and rare (registration, heartbeats,
lookups), and a human can read them in a packet dump or a log.

Encoding is strict: a message that cannot be sent is a local bug and raises
``ValueError``. Decoding treats the stream as hostile: `MessageDecoder.feed`,
`parse_message` and the ``arg_*`` accessors raise `RegistryProtocolError` and
nothing else, whatever they are given, with one readable line that names the
field and what was expected. Decoded JSON is also bounded (nesting depth,
no ``NaN``/``Infinity``, no duplicate keys, no lone surrogates) so that code
downstream (logging, a database, re-encoding) cannot trip over it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, NoReturn, TypeAlias, overload

from .._exceptions import RegistryProtocolError

__all__ = [
    "MAX_DEPTH",
    "MAX_ID",
    "MAX_MESSAGE",
    "OPS",
    "Message",
    "MessageDecoder",
    "Push",
    "Request",
    "Response",
    "arg_list_of_str",
    "arg_str",
    "describe",
    "encode",
    "error",
    "ok",
    "parse_message",
    "push",
    "request",
]

MAX_MESSAGE: Final = 65536
"""Largest JSON payload of one frame, in bytes (the 4-byte length prefix not counted)."""

MAX_DEPTH: Final = 32
"""Deepest nesting of arrays and objects a message may have (the top-level object is 1)."""

MAX_ID: Final = 2**53 - 1
"""Largest request id: the largest integer every JSON implementation represents exactly."""

OPS: Final = frozenset(
    {
        "register",
        "heartbeat",
        "set_tags",
        "lookup",
        "resolve",
        "find_by_tag",
        "connect",
        "unregister",
    }
)
"""The request operations the rendezvous understands."""

_HEADER_SIZE: Final = 4
_SHOWN_CHARS: Final = 40
_KNOWN_OPS: Final = ", ".join(sorted(OPS))
_REQUEST_KEYS: Final = frozenset({"id", "op", "args"})
_PUSH_KEYS: Final = frozenset({"push", "data"})
_ERROR_KEYS: Final = frozenset({"code", "message"})


def describe(value: object) -> str:
    """A short, single-line, never-failing description of `value` for error messages.

    Strings and numbers are shown (strings escaped and cut at 40 characters);
    containers are named by kind only, so a hostile deeply nested value costs
    nothing to describe.
    """
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= _SHOWN_CHARS else value[: _SHOWN_CHARS - 3] + "...")
    if isinstance(value, int):
        digits = value.bit_length() * 30103 // 100000 + 1
        return str(value) if digits <= _SHOWN_CHARS else f"an integer of ~{digits} digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{type(value).__name__} of {len(value)} bytes"
    return f"a {type(value).__name__}"


def _fail(message: str) -> NoReturn:
    raise RegistryProtocolError(message)


# -- framing -------------------------------------------------------------------


def _check_tree(value: object) -> None:
    """Reject nesting deeper than MAX_DEPTH, non-string keys and strings that are not Unicode.

    Raises ValueError; iterative, so hostile depth cannot exhaust the Python stack.
    """
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(
                        f"{describe(item)} contains a lone surrogate (not valid Unicode text)"
                    ) from None
        elif isinstance(item, (dict, list, tuple)):
            if depth > MAX_DEPTH:
                raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for key, sub in item.items():
                    if not isinstance(key, str):
                        raise ValueError(f"object key {describe(key)} is not a string")
                    stack.append((key, depth))
                    stack.append((sub, depth + 1))
            else:
                stack.extend((sub, depth + 1) for sub in item)


def encode(message: Mapping[str, object]) -> bytes:
    """One frame: the 4-byte big-endian length, then compact UTF-8 JSON.

    Raises ``ValueError`` when the message would not decode to itself: not
    JSON-serialisable, non-string keys, ``NaN``/``Infinity``, lone surrogates,
    nested deeper than `MAX_DEPTH`, or larger than `MAX_MESSAGE`.
    """
    obj = dict(message)
    _check_tree(obj)
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except TypeError as exc:
        raise ValueError(f"message is not JSON-serialisable: {exc}") from None
    payload = text.encode("utf-8")
    if len(payload) > MAX_MESSAGE:
        raise ValueError(f"message is {len(payload)} bytes of JSON, over the {MAX_MESSAGE} limit")
    return len(payload).to_bytes(_HEADER_SIZE, "big") + payload


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {describe(key)}")
            seen.add(key)
    return obj


def _decode_payload(payload: bytes) -> dict[str, object]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RegistryProtocolError(
            f"message is not valid UTF-8 (bad byte at offset {exc.start} of {len(payload)})"
        ) from None
    try:
        obj: object = json.loads(
            text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys
        )
    except json.JSONDecodeError as exc:
        raise RegistryProtocolError(
            f"message is not valid JSON: {exc.msg} at character {exc.pos}"
        ) from None
    except RecursionError:
        raise RegistryProtocolError(
            f"message is not acceptable JSON: nested deeper than {MAX_DEPTH} levels"
        ) from None
    except ValueError as exc:  # duplicate key, NaN/Infinity, integer too long to convert
        reason = (str(exc).splitlines() or ["invalid value"])[0]
        raise RegistryProtocolError(f"message is not acceptable JSON: {reason}") from None
    if not isinstance(obj, dict):
        _fail(f"message: expected a JSON object at the top level, got {describe(obj)}")
    try:
        _check_tree(obj)
    except ValueError as exc:
        raise RegistryProtocolError(f"message is not acceptable JSON: {exc}") from None
    return obj


class MessageDecoder:
    """Split a byte stream into decoded JSON objects, buffering partial frames.

    After the first error the decoder stays failed: every later `feed` raises
    the same `RegistryProtocolError` (the stream cannot be resynchronised).
    Complete frames that preceded the bad one in the same `feed` are dropped
    with it; the connection is useless either way.
    """

    __slots__ = ("_buffer", "_failure")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failure: str | None = None

    @property
    def failed(self) -> bool:
        return self._failure is not None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, object]]:
        """Add `data`; return every message that is now complete, in order."""
        if self._failure is not None:
            _fail(self._failure)
        buf = self._buffer
        buf += data
        messages: list[dict[str, object]] = []
        offset = 0
        try:
            while len(buf) - offset >= _HEADER_SIZE:
                size = int.from_bytes(buf[offset : offset + _HEADER_SIZE], "big")
                if size > MAX_MESSAGE:
                    _fail(f"message length {size} exceeds the {MAX_MESSAGE}-byte limit")
                end = offset + _HEADER_SIZE + size
                if len(buf) < end:
                    break
                messages.append(_decode_payload(bytes(buf[offset + _HEADER_SIZE : end])))
                offset = end
        except RegistryProtocolError as exc:
            self._failure = str(exc)
            buf.clear()
            raise
        del buf[:offset]
        return messages


# -- messages ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """A node asks the rendezvous to do `op` with `args`; the answer carries the same `id`."""

    id: int
    op: str
    args: dict[str, object]


@dataclass(frozen=True, slots=True)
class Response:
    """The answer to request `id`: exactly one of `result` and `error` (``(code, message)``).

    A successful ``null`` result is ``result=None, error=None``.
    """

    id: int
    result: object | None
    error: tuple[str, str] | None


@dataclass(frozen=True, slots=True)
class Push:
    """An unsolicited message from the rendezvous (e.g. a peer wants to connect)."""

    name: str
    data: dict[str, object]


Message: TypeAlias = Request | Response | Push


def _check_id(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        _fail(f"{where} 'id': expected an integer 0..2**53-1, got {describe(value)}")
    return value


def _check_keys(obj: dict[str, object], allowed: frozenset[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            expected = ", ".join(sorted(allowed))
            _fail(f"{where}: unexpected key {describe(key)} (expected only {expected})")


def parse_message(obj: dict[str, object]) -> Message:
    """Classify and check one decoded JSON object; `RegistryProtocolError` if it fits no shape."""
    if not isinstance(obj, dict):
        _fail(f"message: expected a JSON object, got {describe(obj)}")
    if "push" in obj:
        _check_keys(obj, _PUSH_KEYS, "push")
        name = obj["push"]
        if not isinstance(name, str) or not name:
            _fail(f"push 'push': expected a non-empty string, got {describe(name)}")
        data = obj.get("data")
        if not isinstance(data, dict):
            _fail(f"push 'data': expected an object, got {describe(data)}")
        return Push(name, data)
    if "op" in obj:
        _check_keys(obj, _REQUEST_KEYS, "request")
        if "id" not in obj:
            _fail("request 'id': expected an integer 0..2**53-1, missing")
        request_id = _check_id(obj["id"], "request")
        op = obj["op"]
        if not isinstance(op, str):
            _fail(f"request 'op': expected a string, got {describe(op)}")
        if op not in OPS:
            _fail(f"request 'op': unknown op {describe(op)}, expected one of {_KNOWN_OPS}")
        args = obj.get("args")
        if not isinstance(args, dict):
            _fail(f"request 'args': expected an object, got {describe(args)}")
        return Request(request_id, op, args)
    if "result" in obj or "error" in obj:
        if "result" in obj and "error" in obj:
            _fail("response: has both 'result' and 'error', expected exactly one")
        kind = "result" if "result" in obj else "error"
        _check_keys(obj, frozenset({"id", kind}), "response")
        if "id" not in obj:
            _fail("response 'id': expected an integer 0..2**53-1, missing")
        response_id = _check_id(obj["id"], "response")
        if kind == "result":
            return Response(response_id, obj["result"], None)
        err = obj["error"]
        if not isinstance(err, dict):
            _fail(
                f"response 'error': expected an object with code and message, got {describe(err)}"
            )
        _check_keys(err, _ERROR_KEYS, "response 'error'")
        code, message = err.get("code"), err.get("message")
        if not isinstance(code, str) or not code:
            _fail(f"response 'error.code': expected a non-empty string, got {describe(code)}")
        if not isinstance(message, str):
            _fail(f"response 'error.message': expected a string, got {describe(message)}")
        return Response(response_id, None, (code, message))
    keys = ", ".join(describe(k) for k in list(obj)[:5]) or "none"
    _fail(
        "message: expected a request ('op'), a response ('result' or 'error') "
        f"or a push ('push'); keys were {keys}"
    )


# -- builders --------------------------------------------------------------------


def _local_id(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise ValueError(f"message id must be an integer 0..2**53-1, got {value!r}")
    return value


def request(id: int, op: str, **args: object) -> dict[str, object]:
    """``{"id": id, "op": op, "args": args}``; ``ValueError`` for an unknown op or a bad id."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: expected one of {_KNOWN_OPS}")
    return {"id": _local_id(id), "op": op, "args": dict(args)}


def ok(id: int, result: object) -> dict[str, object]:
    """``{"id": id, "result": result}``."""
    return {"id": _local_id(id), "result": result}


def error(id: int, code: str, message: str) -> dict[str, object]:
    """``{"id": id, "error": {"code": code, "message": message}}``."""
    if not isinstance(code, str) or not code or not isinstance(message, str):
        raise ValueError(f"error code and message must be strings, got {code!r}, {message!r}")
    return {"id": _local_id(id), "error": {"code": code, "message": message}}


def push(name: str, data: Mapping[str, object]) -> dict[str, object]:
    """``{"push": name, "data": data}``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"push name must be a non-empty string, got {name!r}")
    return {"push": name, "data": dict(data)}


# -- argument accessors ------------------------------------------------------------


@overload
def arg_str(req: Request, name: str, *, optional: Literal[False] = False) -> str: ...
@overload
def arg_str(req: Request, name: str, *, optional: bool) -> str | None: ...
def arg_str(req: Request, name: str, *, optional: bool = False) -> str | None:
    """``req.args[name]`` as a string; a missing (or ``null``) optional argument is ``None``."""
    value = req.args.get(name)
    if value is None:
        if optional:
            return None
        if name not in req.args:
            _fail(f"'{name}': expected a string, missing")
    if not isinstance(value, str):
        _fail(f"'{name}': expected a string, got {describe(value)}")
    return value


def arg_list_of_str(req: Request, name: str, *, max_items: int) -> list[str]:
    """``req.args[name]`` as a list of at most `max_items` strings (required)."""
    if name not in req.args:
        _fail(f"'{name}': expected a list of at most {max_items} strings, missing")
    value = req.args[name]
    if not isinstance(value, list):
        _fail(f"'{name}': expected a list of at most {max_items} strings, got {describe(value)}")
    if len(value) > max_items:
        _fail(f"'{name}': expected a list of at most {max_items} strings, got {len(value)} items")
    for item in value:
        if not isinstance(item, str):
            _fail(f"'{name}': expected a list of strings, got an item that is {describe(item)}")
    return list(value)
