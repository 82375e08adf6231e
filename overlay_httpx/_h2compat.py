"""Work-arounds for costs and quirks of the h2 / hpack / hyperframe libraries, in one place.

* `use_local_settings`: h2 applies our MAX_FRAME_SIZE only once the peer
  acknowledges it, and checks every frame of a received chunk against the
  size in force when the chunk arrived, so a big DATA frame right behind that
  ACK would be refused. Accepting big frames before the ACK is harmless.
* `cache_hpack`: one connection's HPACK encoder and decoder remember the header
  blocks they made or read while their dynamic table stays the same. A client
  sends much the same request headers again and again and gets much the same
  response headers back; once the table holds them, the block is the same
  bytes every time, and pure-Python HPACK (Huffman coding most of all) was
  the largest h2 cost of a small request (over 0.1 ms of server CPU).
* `install` (run on import): process-wide cost cuts that change nothing but
  frame reprs and hpack's debug logging.
  h2 logs every received frame with ``repr(frame)``, computed eagerly even when
  logging is off, and hyperframe's repr serialises the frame (a DATA frame's
  whole payload, hex-encoded: a third of the client's CPU on a 64 MiB
  download), so frame reprs become O(1). hpack's debug logging (26 calls per
  request, each checking the logging level) is dropped. hyperframe rebuilds the
  set of valid flag names for every frame it makes; it is built once per frame
  class. h2's connection and stream state machines look up every transition in
  dicts keyed by enums whose ``__hash__`` is Python code; they hash by identity
  (what their equality already is), and the tables are rebuilt to match.
  Each cut checks that the installed versions look as expected and is left
  out otherwise. It is idempotent (the classes are shared by the process).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any, Final, cast

import h2.connection
import h2.stream
import hpack.hpack
import hpack.table
import hyperframe.flags
import hyperframe.frame
from h2.connection import H2Connection
from h2.settings import Settings
from hpack import Decoder, Encoder, HeaderTuple
from hpack.table import HeaderTable
from hyperframe.frame import DataFrame, Frame

__all__ = ["Spares", "cache_hpack", "install", "use_local_settings"]

#: header blocks longer than this (bytes) are never cached: they are rare, and a
#: peer must not be able to pin much memory in the caches
_MAX_CACHED_BLOCK: Final = 1024
#: nor are header lists of more fields, or of more name and value bytes in all
#: (an indexed field is a byte or two in the block but up to the table's size decoded)
_MAX_CACHED_FIELDS: Final = 64
_MAX_CACHED_BYTES: Final = 4096
#: blocks each cache keeps before it starts over
_MAX_CACHED_BLOCKS: Final = 32


def use_local_settings(conn: H2Connection, settings: Settings, max_frame_size: int) -> None:
    """Announce `settings` (sent by ``initiate_connection``) and accept frames of
    up to `max_frame_size` at once, not only after the peer's ACK."""
    conn.local_settings = settings
    conn.max_inbound_frame_size = max_frame_size


# -- connections made ahead of time -------------------------------------------------------------


class Spares:
    """New connections' h2 state made ahead of time, one spare per set of arguments.

    Building an `H2Connection` (settings, HPACK coders, preface) costs about as
    much as a request; made while nothing waits (`prepare`), it is off the new
    connection's path. It depends on nothing about the peer, so one spare serves
    the whole process; each serves exactly one connection (`take` removes it).
    """

    def __init__(self, make: Callable[..., H2Connection]) -> None:
        self._make = make
        self.ready: dict[tuple[Any, ...], H2Connection] = {}

    def take(self, *args: Any) -> H2Connection:
        """The spare made with `args`, or one made now if there is none."""
        spare = self.ready.pop(args, None)  # one atomic step: nodes may run on threads
        return spare if spare is not None else self._make(*args)

    def prepare(self, *args: Any) -> None:
        """Make the spare for `args` unless it is there."""
        if args not in self.ready:
            self.ready[args] = self._make(*args)


# -- HPACK block caches ------------------------------------------------------------------------

_base_maxsize: Any = vars(HeaderTable).get("maxsize")


class _CountingTable(HeaderTable):
    """A `HeaderTable` that counts its changes (entries added or evicted, size changed).

    Encoding or decoding a block is a pure function of the block and the table,
    so a cached result stays right for as long as the count has not moved. hpack
    changes its table only through `add` and the `maxsize` setter.
    """

    changes = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.changes += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return int(_base_maxsize.__get__(self))

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.changes += 1
        _base_maxsize.__set__(self, newmax)


class _CachingEncoder(Encoder):
    """An HPACK encoder that reuses the block it made for the same header list.

    Only lists of plain ``(bytes, bytes)`` tuples are cached: never-indexed
    fields (`hpack.NeverIndexedHeaderTuple`, sensitive three-tuples) are left
    to hpack each time, so their values are never kept. A list is cached once
    encoding it left the table unchanged (every field was already indexed), and
    the cached block is used while the table still is.

    Literals are written without Huffman coding, whatever h2 asks: pure-Python
    Huffman costs about 1 µs a byte on each side, a quarter of a new
    connection's HTTP/2 time, to save a quarter of the bytes of headers that
    the dynamic table indexes after the first request anyway.
    """

    header_table: _CountingTable
    _blocks: dict[tuple[tuple[bytes, bytes], ...], tuple[int, bytes]]

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        huffman = False  # see the class docstring
        table = self.header_table
        if table.resized or isinstance(headers, dict):
            return super().encode(headers, huffman)  # a size update goes first: not cacheable
        fields = headers if type(headers) is list else list(headers)
        if len(fields) > _MAX_CACHED_FIELDS:
            return super().encode(fields, huffman)
        size = 0
        for field in fields:
            if type(field) is not tuple or len(field) != 2:
                return super().encode(fields, huffman)
            name, value = field
            if type(name) is not bytes or type(value) is not bytes:
                return super().encode(fields, huffman)
            size += len(name) + len(value)
        if size > _MAX_CACHED_BYTES:
            return super().encode(fields, huffman)
        key = tuple(fields)
        blocks = self._blocks
        cached = blocks.get(key)
        changes = table.changes
        if cached is not None and cached[0] == changes:
            return cached[1]
        block = super().encode(fields, huffman)
        if table.changes == changes and len(block) <= _MAX_CACHED_BLOCK:
            if len(blocks) >= _MAX_CACHED_BLOCKS:
                blocks.clear()
            blocks[key] = (changes, block)
        return block


class _CachingDecoder(Decoder):
    """An HPACK decoder that reuses the header list it read from the same block.

    A block that left the table unchanged (indexed fields and literals without
    indexing) decodes to the same list for as long as the table stays so, and
    under the same limits. Blocks carrying a never-indexed field are not kept.
    Each call returns a new list.
    """

    header_table: _CountingTable
    _blocks: dict[bytes, tuple[tuple[int, int, int, bool], tuple[HeaderTuple, ...]]]

    def decode(self, data: bytes, raw: bool = False) -> Iterable[HeaderTuple]:
        if len(data) > _MAX_CACHED_BLOCK:
            return super().decode(data, raw)
        key = bytes(data)
        table = self.header_table
        state = (table.changes, self.max_header_list_size, self.max_allowed_table_size, raw)
        blocks = self._blocks
        cached = blocks.get(key)
        if cached is not None and cached[0] == state:
            return list(cached[1])
        headers = list(super().decode(data, raw))
        if table.changes == state[0] and len(headers) <= _MAX_CACHED_FIELDS:
            size = 0
            for header in headers:
                if type(header) is not HeaderTuple:
                    return headers  # never-indexed: not kept
                size += len(header[0]) + len(header[1])
            if size > _MAX_CACHED_BYTES:
                return headers
            if len(blocks) >= _MAX_CACHED_BLOCKS:
                blocks.clear()
            blocks[key] = (state, tuple(headers))
        return headers


def _hpack_cacheable(conn: H2Connection) -> bool:
    """The connection's coder objects are hpack's own, laid out as `_CountingTable` expects."""
    return (
        isinstance(_base_maxsize, property)
        and _base_maxsize.fset is not None
        and type(conn.encoder) is Encoder
        and type(conn.decoder) is Decoder
        and type(conn.encoder.header_table) is HeaderTable
        and type(conn.decoder.header_table) is HeaderTable
    )


def cache_hpack(conn: H2Connection) -> None:
    """Give `conn`'s HPACK encoder and decoder block caches (see the module docstring).

    The objects keep their state and only gain the caches; with an hpack or h2
    that does not look as expected, nothing changes.
    """
    if not _hpack_cacheable(conn):
        return
    encoder, decoder = conn.encoder, conn.decoder
    encoder.header_table.__class__ = _CountingTable
    decoder.header_table.__class__ = _CountingTable
    encoder.__class__ = _CachingEncoder
    decoder.__class__ = _CachingDecoder
    cast(_CachingEncoder, encoder)._blocks = {}
    cast(_CachingDecoder, decoder)._blocks = {}


# -- process-wide cuts -------------------------------------------------------------------------


def _frame_repr(self: Frame) -> str:
    return f"{type(self).__name__}(stream_id={self.stream_id}, body_len={self.body_len})"


def _data_frame_body_repr(self: DataFrame) -> str:
    return f"<{len(self.data)} bytes of data, {self.pad_length} of padding>"


def _data_frame_repr(self: DataFrame) -> str:
    return f"DataFrame(stream_id={self.stream_id}): {_data_frame_body_repr(self)}"


def _cheap_frame_reprs() -> None:
    frame = DataFrame(1, b"x")
    if not hasattr(frame, "body_len") or not hasattr(frame, "pad_length"):
        return
    Frame.__repr__ = _frame_repr  # type: ignore[method-assign]
    DataFrame.__repr__ = _data_frame_repr  # type: ignore[method-assign,assignment]
    DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]


class _QuietLogger:
    """Stands in for one of hpack's module loggers: `debug` does nothing, the rest passes."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def debug(self, *args: object, **kwargs: object) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


def _quiet_hpack_logging() -> None:
    for module in (hpack.hpack, hpack.table):
        logger = getattr(module, "log", None)
        if isinstance(logger, logging.Logger):
            setattr(module, "log", _QuietLogger(logger))  # noqa: B010  (typed as a Logger)


def _cached_flag_names() -> None:
    flags_class = hyperframe.flags.Flags
    probe = flags_class([hyperframe.flags.Flag("X", 1)])
    if set(vars(probe)) != {"_valid_flags", "_flags"} or probe._valid_flags != {"X"}:
        return
    names: dict[int, tuple[object, frozenset[str]]] = {}

    def init(self: hyperframe.flags.Flags, defined_flags: Iterable[hyperframe.flags.Flag]) -> None:
        cached = names.get(id(defined_flags))
        if cached is not None and cached[0] is defined_flags:
            valid = cached[1]
        else:
            valid = frozenset(flag.name for flag in defined_flags)
            if len(names) < 64 and isinstance(defined_flags, list):  # the frame classes' lists
                names[id(defined_flags)] = (defined_flags, valid)
        self._valid_flags = valid  # type: ignore[assignment]
        self._flags = set()

    flags_class.__init__ = init  # type: ignore[method-assign]


def _keyed_by(container: object, enums: tuple[type[Enum], ...]) -> bool:
    """`container` is a dict or set keyed by a member of `enums` (or by tuples holding one)."""
    if not isinstance(container, (dict, set, frozenset)):
        return False
    for key in container:
        parts = key if isinstance(key, tuple) else (key,)
        if any(isinstance(part, enums) for part in parts):
            return True
    return False


def _identity_hashed_state_machines() -> None:
    """Hash h2's state-machine enums by identity and rebuild the transition tables.

    Not `h2.stream.StreamState`: an IntEnum, whose hash is already an int's.
    Skipped unless the two transition tables are the only hashed containers of
    h2's that use these enums as keys (any other would stop finding its keys).
    """
    enums: tuple[type[Enum], ...] = (
        h2.connection.ConnectionState,
        h2.connection.ConnectionInputs,
        h2.stream.StreamInputs,
    )
    if any(enum.__hash__ is not Enum.__hash__ for enum in enums):
        return  # already done, or not the Enum hash we know
    machine = h2.connection.H2ConnectionStateMachine
    connection_table = vars(machine).get("_transitions")
    stream_table = vars(h2.stream).get("_transitions")
    if not isinstance(connection_table, dict) or not isinstance(stream_table, dict):
        return
    namespaces: list[dict[str, Any]] = []
    for module in (h2.connection, h2.stream):
        namespaces.append(vars(module))
        namespaces.extend(
            dict(vars(value)) for value in vars(module).values() if isinstance(value, type)
        )
    for namespace in namespaces:
        for value in namespace.values():
            if (
                value is not connection_table
                and value is not stream_table
                and _keyed_by(value, enums)
            ):
                return
    for enum in enums:
        enum.__hash__ = object.__hash__  # type: ignore[method-assign]
    machine._transitions = dict(connection_table.items())
    items = list(stream_table.items())
    stream_table.clear()
    stream_table.update(items)


_installed = False


def install() -> None:
    """Apply the process-wide cost cuts (see the module docstring); idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    steps: list[Callable[[], None]] = [
        _cheap_frame_reprs,
        _quiet_hpack_logging,
        _cached_flag_names,
        _identity_hashed_state_machines,
    ]
    for step in steps:
        try:
            step()
        except Exception:  # an h2 / hpack / hyperframe unlike the ones we know: skip the cut
            logging.getLogger("overlay_httpx").debug("h2 work-around %s skipped", step.__name__)


install()
