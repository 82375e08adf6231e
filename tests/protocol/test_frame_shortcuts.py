"""The shortcuts for STREAM and ACK frames write exactly what the generic layout writes.

`encode_frame` and `encoded_size` take a direct path for the frames of nearly
every packet; `_encode_generic` and `_encoded_size_generic` are the reference.
Invalid frames must fail the same way too (same exception, same message, same
bytes appended before it).
"""

from __future__ import annotations

import dataclasses

import pytest
from _fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from overlay_httpx._protocol._fastinit import fast_frozen_init
from overlay_httpx._protocol._frames import (
    MAX_VARINT,
    Ack,
    Frame,
    Stream,
    _encode_generic,
    _encoded_size_generic,
    encode_frame,
    encoded_size,
)

# Mostly valid values, with the ones the wire cannot carry mixed in.
ints = st.one_of(
    st.sampled_from([0, 1, 63, 64, 16383, 16384, 2**30 - 1, 2**30, MAX_VARINT]),
    st.integers(0, MAX_VARINT),
    st.sampled_from([-1, MAX_VARINT + 1, 2**70]),
)
ports = st.one_of(st.none(), st.integers(0, 65535), st.sampled_from([-1, 65536]))


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    data = draw(st.binary(max_size=64))
    offset = draw(st.one_of(st.just(0), ints, st.integers(MAX_VARINT - 70, MAX_VARINT)))
    return Stream(draw(ints), offset, data, draw(st.booleans()), draw(ports))


@st.composite
def acks(draw: st.DrawFn) -> Ack:
    ranges = draw(st.lists(st.tuples(ints, ints), min_size=0, max_size=3))
    if draw(st.booleans()):  # mostly well-formed single ranges
        largest = draw(ints)
        ranges = [(largest - draw(st.integers(0, max(largest, 0))), largest)]
    return Ack(tuple(ranges), draw(ints))


def outcome(run: object) -> tuple[object, ...]:
    assert callable(run)
    try:
        return ("ok", run())
    except (ValueError, TypeError) as exc:
        return (type(exc), str(exc))


@pytest.mark.fuzz
@fuzz_settings(2000)
@given(st.one_of(streams(), acks()), st.booleans())
def test_shortcuts_match_the_generic_layout(frame: Frame, last: bool) -> None:
    fast, generic = bytearray(b"x"), bytearray(b"x")
    assert outcome(lambda: encode_frame(frame, fast, last=last)) == outcome(
        lambda: _encode_generic(frame, generic, last)
    )
    assert fast == generic
    size = outcome(lambda: encoded_size(frame))
    assert size == outcome(lambda: _encoded_size_generic(frame))
    if size[0] == "ok" and not last:
        assert size[1] == len(fast) - 1


def test_fast_frozen_init_keeps_dataclass_behaviour() -> None:
    frame = Stream(stream_id=4, offset=0, data=b"x", fin=True, port=80)
    assert frame == Stream(4, 0, b"x", True, 80)
    assert hash(frame) == hash(Stream(4, 0, b"x", True, 80))
    assert repr(frame) == "Stream(stream_id=4, offset=0, data=b'x', fin=True, port=80)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.offset = 1  # type: ignore[misc]
    with pytest.raises(TypeError, match="takes 6 positional arguments"):
        Stream(4, 0, b"x", True, 80, 1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'port'"):
        Stream(4, 0, b"x", True)  # type: ignore[call-arg]


def test_fast_frozen_init_refuses_what_it_cannot_copy() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class WithDefault:
        a: int
        b: int = 0

    @dataclasses.dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    for cls in (WithDefault, NotFrozen, NoSlots):
        with pytest.raises(TypeError):
            fast_frozen_init(cls)
