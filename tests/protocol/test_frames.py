from __future__ import annotations

import contextlib
from typing import get_args

import pytest
from _fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from overlay_httpx._exceptions import FrameError
from overlay_httpx._protocol._frames import (
    MAX_VARINT,
    Ack,
    Close,
    DataBlocked,
    Frame,
    MaxData,
    MaxStreamData,
    MaxStreams,
    Padding,
    PathChallenge,
    PathResponse,
    Ping,
    ResetStream,
    StopSending,
    Stream,
    StreamDataBlocked,
    decode_varint,
    encode_frame,
    encode_varint,
    encoded_size,
    is_ack_eliciting,
    parse_frames,
    stream_frame_overhead,
    varint_size,
)

EDGES = [0, 1, 63, 64, 16383, 16384, 2**30 - 1, 2**30, 2**62 - 1]


def encode(*frames: Frame, last: bool = False) -> bytes:
    out = bytearray()
    for i, frame in enumerate(frames):
        encode_frame(frame, out, last=last and i == len(frames) - 1)
    return bytes(out)


def roundtrip(frame: Frame) -> None:
    raw = encode(frame)
    assert len(raw) == encoded_size(frame)
    assert parse_frames(raw) == [frame]
    assert parse_frames(memoryview(raw)) == [frame]


def merge_padding(frames: list[Frame]) -> list[Frame]:
    merged: list[Frame] = []
    for f in frames:
        if isinstance(f, Padding) and merged and isinstance(merged[-1], Padding):
            merged[-1] = Padding(merged[-1].length + f.length)
        else:
            merged.append(f)
    return merged


# -- varints ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 1),
        (63, 1),
        (64, 2),
        (16383, 2),
        (16384, 4),
        (2**30 - 1, 4),
        (2**30, 8),
        (2**62 - 1, 8),
    ],
)
def test_varint_boundaries(value: int, size: int) -> None:
    out = bytearray(b"xx")
    encode_varint(value, out)
    assert len(out) == 2 + size == 2 + varint_size(value)
    assert decode_varint(bytes(out), 2) == (value, 2 + size)
    assert decode_varint(memoryview(out), 2) == (value, 2 + size)


def test_varint_rfc_examples() -> None:
    # RFC 9000 appendix A.1
    assert decode_varint(bytes.fromhex("c2197c5eff14e88c"), 0) == (151288809941952652, 8)
    assert decode_varint(bytes.fromhex("9d7f3e7d"), 0) == (494878333, 4)
    assert decode_varint(bytes.fromhex("7bbd"), 0) == (15293, 2)
    assert decode_varint(bytes.fromhex("25"), 0) == (37, 1)
    assert decode_varint(bytes.fromhex("4025"), 0) == (37, 2)  # non-minimal is accepted


@pytest.mark.parametrize("value", [-1, -(2**70), 2**62, 2**64])
def test_varint_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="varint"):
        encode_varint(value, bytearray())
    with pytest.raises(ValueError, match="varint"):
        varint_size(value)


@pytest.mark.parametrize("raw", [b"", b"\x40", b"\x80\x00\x00", b"\xc0" + bytes(6)])
def test_varint_truncated(raw: bytes) -> None:
    with pytest.raises(FrameError, match="truncated"):
        decode_varint(raw, 0)


@given(st.integers(0, MAX_VARINT))
def test_varint_roundtrip(value: int) -> None:
    out = bytearray()
    encode_varint(value, out)
    assert decode_varint(bytes(out), 0) == (value, len(out))


# -- round trips of every frame type ---------------------------------------------------------


@pytest.mark.parametrize("v", EDGES)
def test_integer_frames_roundtrip(v: int) -> None:
    frames: list[Frame] = [
        ResetStream(v, v, v),
        ResetStream(v, 0, MAX_VARINT - v),
        StopSending(v, v),
        MaxData(v),
        MaxStreamData(v, v),
        MaxStreams(v),
        DataBlocked(v),
        StreamDataBlocked(v, v),
        Close(v, ""),
        Ack(((v, v),), v),
        Ack(((0, v),), 0),
        Stream(v, v or 1, b"", False, None),
        Stream(v, 0, b"", True, 0),
    ]
    for frame in frames:
        roundtrip(frame)


@pytest.mark.parametrize(
    "frame",
    [
        Ping(),
        Padding(1),
        Padding(1200),
        PathChallenge(b"\x00" * 8),
        PathResponse(bytes(range(8))),
        Close(0, "bye"),
        Close(2**62 - 1, "déjà vu ✓"),
        Close(1, "x" * 1024),
        Stream(0, 0, b"GET / HTTP/1.1\r\n", False, 80),
        Stream(4, 0, b"x", True, 65535),
        Stream(4, 1000, b"y" * 5000, True, None),
        Stream(4, 2**62 - 2, b"z", True, None),
        Ack(((10, 20), (5, 8), (0, 3)), 25_000),
        Ack(((2**62 - 1, 2**62 - 1), (0, 2**62 - 3)), 0),
    ],
)
def test_frame_roundtrip(frame: Frame) -> None:
    roundtrip(frame)


def test_ack_many_ranges() -> None:
    # every other packet of 0..1999 received, so 1000 single-packet ranges
    ranges = tuple((n, n) for n in range(1998, -1, -2))
    frame = Ack(ranges, 1234)
    raw = encode(frame)
    assert raw[:1] == b"\x02"
    roundtrip(frame)


def test_ack_wire_layout_matches_rfc() -> None:
    # largest 20, delay 7, 2 more ranges, first range 10 (10..20); gap 0 -> 8, len 3 -> 5..8;
    # gap 0 -> 3, len 3 -> 0..3
    raw = encode(Ack(((10, 20), (5, 8), (0, 3)), 7))
    assert raw == bytes([0x02, 20, 7, 2, 10, 0, 3, 0, 3])


@pytest.mark.parametrize(
    "ranges",
    [
        (),
        ((5, 4),),
        ((-1, 3),),
        ((5, 9), (4, 4)),  # adjacent
        ((5, 9), (3, 6)),  # overlapping
        ((5, 9), (10, 12)),  # ascending
        ((5, 9), (2, 1)),  # reversed pair
    ],
)
def test_ack_encode_rejects_bad_ranges(ranges: tuple[tuple[int, int], ...]) -> None:
    with pytest.raises(ValueError, match="ACK"):
        encode(Ack(ranges, 0))
    with pytest.raises(ValueError, match="ACK"):
        encoded_size(Ack(ranges, 0))


def test_stream_without_length_fills_packet() -> None:
    frame = Stream(8, 100, b"tail bytes", False, None)
    with_len = encode(frame)
    without = encode(frame, last=True)
    assert len(without) == len(with_len) - 1
    assert with_len[0] == 0x08 | 0x04 | 0x02
    assert without[0] == 0x08 | 0x04
    assert parse_frames(without) == [frame]
    # preceded by other frames, still fills the rest
    raw = encode(Ping(), MaxData(5), frame, last=True)
    assert parse_frames(raw) == [Ping(), MaxData(5), frame]


def test_stream_offset_zero_carries_port() -> None:
    frame = Stream(0, 0, b"hello", False, 8080)
    raw = encode(frame)
    assert raw == bytes([0x0A, 0x00, 0x5F, 0x90, 0x05]) + b"hello"
    assert parse_frames(raw) == [frame]
    assert stream_frame_overhead(0, 0, 5, 8080) == len(raw) - 5
    assert stream_frame_overhead(0, 0, 5, 8080) + 5 == encoded_size(frame)


def test_stream_fin_only_empty() -> None:
    frame = Stream(4, 37, b"", True, None)
    raw = encode(frame)
    assert raw == bytes([0x0F, 4, 37, 0])
    assert parse_frames(raw) == [frame]
    assert parse_frames(encode(frame, last=True)) == [frame]


@pytest.mark.parametrize(
    ("sid", "offset", "size", "port"),
    [(0, 0, 0, 0), (2**62 - 1, 0, 16384, 65535), (5, 1 << 30, 1200, None), (64, 63, 63, None)],
)
def test_stream_frame_overhead(sid: int, offset: int, size: int, port: int | None) -> None:
    frame = Stream(sid, offset, bytes(size), False, port)
    assert stream_frame_overhead(sid, offset, size, port) + size == encoded_size(frame)
    assert encoded_size(frame) == len(encode(frame))


@pytest.mark.parametrize(
    "frame",
    [
        Stream(1, 0, b"", False, None),  # offset 0 needs a port
        Stream(1, 5, b"", False, 80),  # port only at offset 0
        Stream(1, 0, b"", False, 65536),
        Stream(1, 0, b"", False, -1),
        Stream(1, 2**62 - 1, b"ab", False, None),
        Stream(-1, 1, b"", False, None),
        PathChallenge(b"short"),
        PathResponse(b"123456789"),
        Padding(0),
        MaxData(2**62),
        Close(-1, ""),
    ],
)
def test_encode_rejects_invalid_frames(frame: Frame) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - several distinct messages
        encode(frame)
    with pytest.raises(ValueError):  # noqa: PT011
        encoded_size(frame)


def test_close_reason_is_cut_to_1024_bytes_on_a_character_boundary() -> None:
    frame = Close(3, "é" * 600)  # 1200 bytes of UTF-8
    raw = encode(frame)
    assert len(raw) == encoded_size(frame)
    (parsed,) = parse_frames(raw)
    assert parsed == Close(3, "é" * 512)


def test_close_reason_invalid_utf8_is_replaced() -> None:
    assert parse_frames(b"\x1c\x01\x02\xff\xfe") == [Close(1, "\ufffd\ufffd")]


def test_padding_runs_merge() -> None:
    raw = bytes(3) + encode(Ping()) + bytes(5) + encode(Padding(2), Padding(4))
    assert parse_frames(raw) == [Padding(3), Ping(), Padding(11)]
    assert parse_frames(b"") == []


def test_ack_eliciting() -> None:
    assert not is_ack_eliciting(Ack(((0, 0),), 0))
    assert not is_ack_eliciting(Padding(4))
    assert not is_ack_eliciting(Close(0, ""))
    eliciting: list[Frame] = [
        Ping(),
        Stream(0, 0, b"", True, 1),
        MaxData(1),
        MaxStreamData(1, 1),
        MaxStreams(1),
        DataBlocked(1),
        StreamDataBlocked(1, 1),
        ResetStream(1, 1, 1),
        StopSending(1, 1),
        PathChallenge(bytes(8)),
        PathResponse(bytes(8)),
    ]
    for frame in eliciting:
        assert is_ack_eliciting(frame)


# -- malformed input -------------------------------------------------------------------------

MALFORMED = [
    (b"\x03", "unknown frame type"),
    (b"\x01\x1d", "unknown frame type"),
    (b"\x40\x01", "unknown frame type"),  # PING in a two-byte varint: not minimal
    (b"\xff", "unknown frame type"),
    (b"\x02", "ACK"),
    (b"\x02\x05\x00\x00", "ACK"),
    (b"\x02\x05\x00\x00\x06", "ACK"),  # first range below 0
    (b"\x02\x05\x00\x01\x02\x00", "ACK"),  # truncated range
    (b"\x02\x05\x00\x01\x02\x02\x00", "ACK"),  # gap underflows: 3 - 2 - 2 = -1
    (b"\x02\x05\x00\x01\x00\x00\x05", "ACK"),  # range length underflows
    (b"\x02\x05\x00\xbf\xff\xff\xff\x00", "ACK"),  # absurd range count
    (b"\x04\x01\x02", "RESET_STREAM"),
    (b"\x05\x01", "STOP_SENDING"),
    (b"\x08", "STREAM"),
    (b"\x08\x01", "STREAM"),  # no port
    (b"\x08\x01\x80\x01\x00\x00", "STREAM"),  # port 65536
    (b"\x0c\x01\x00", "STREAM"),  # OFF bit with offset 0
    (b"\x0a\x01\x05\x05abc", "STREAM"),  # length beyond payload
    (b"\x0e\x01\x05", "STREAM"),  # no length
    (b"\x0c\x01\xff\xff\xff\xff\xff\xff\xff\xffab", "STREAM"),  # beyond 2^62-1
    (b"\x10", "MAX_DATA"),
    (b"\x11\x01", "MAX_STREAM_DATA"),
    (b"\x12\x80", "MAX_STREAMS"),
    (b"\x14", "DATA_BLOCKED"),
    (b"\x15\x00", "STREAM_DATA_BLOCKED"),
    (b"\x1a1234567", "PATH_CHALLENGE"),
    (b"\x1b", "PATH_RESPONSE"),
    (b"\x1c", "CLOSE"),
    (b"\x1c\x00\x05abc", "CLOSE"),
    (b"\x1c\x00\x44\x01" + b"x" * 1025, "CLOSE"),  # reason over 1024 bytes
]


@pytest.mark.parametrize(("raw", "name"), MALFORMED)
def test_malformed_frames_raise_frame_error(raw: bytes, name: str) -> None:
    with pytest.raises(FrameError, match=name):
        parse_frames(raw)
    with pytest.raises(FrameError, match=name):
        parse_frames(b"\x00\x00\x01" + raw)  # after valid frames too


def test_ack_gap_of_exactly_the_room_left_is_valid() -> None:
    # largest 5, first range 2 -> 3..5; gap 1 -> hi 0, len 0 -> 0..0
    assert parse_frames(b"\x02\x05\x00\x01\x02\x01\x00") == [Ack(((3, 5), (0, 0)), 0)]


def test_odd_memoryviews_are_accepted() -> None:
    raw = encode(Ping(), MaxData(300))
    assert parse_frames(memoryview(raw).cast("b")) == [Ping(), MaxData(300)]
    assert parse_frames(memoryview(bytearray(raw))) == [Ping(), MaxData(300)]
    assert parse_frames(memoryview(b"\x00" + raw)[1:]) == [Ping(), MaxData(300)]


# -- property tests --------------------------------------------------------------------------

varints = st.one_of(st.sampled_from(EDGES), st.integers(0, MAX_VARINT))
small = st.integers(0, 1000)
path_data = st.binary(min_size=8, max_size=8)


@st.composite
def acks(draw: st.DrawFn) -> Ack:
    largest = draw(varints)
    smallest = largest - draw(st.integers(0, largest))
    ranges = [(smallest, largest)]
    for gap, length in draw(st.lists(st.tuples(varints, varints), max_size=20)):
        hi = smallest - gap - 2
        if hi - length < 0:
            break
        ranges.append((hi - length, hi))
        smallest = hi - length
    return Ack(tuple(ranges), draw(varints))


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    data = draw(st.binary(max_size=300))
    if draw(st.booleans()):
        return Stream(draw(varints), 0, data, draw(st.booleans()), draw(st.integers(0, 65535)))
    offset = draw(st.integers(1, MAX_VARINT - len(data)))
    return Stream(draw(varints), offset, data, draw(st.booleans()), None)


frames_st: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Padding, st.integers(1, 50)),
    st.just(Ping()),
    acks(),
    st.builds(ResetStream, varints, varints, varints),
    st.builds(StopSending, varints, varints),
    streams(),
    st.builds(MaxData, varints),
    st.builds(MaxStreamData, varints, varints),
    st.builds(MaxStreams, varints),
    st.builds(DataBlocked, varints),
    st.builds(StreamDataBlocked, varints, varints),
    st.builds(PathChallenge, path_data),
    st.builds(PathResponse, path_data),
    st.builds(Close, varints, st.text(max_size=200)),
)


@pytest.mark.fuzz
@fuzz_settings(300)
@given(st.lists(frames_st, max_size=12), st.booleans())
def test_frames_roundtrip(frames: list[Frame], last: bool) -> None:
    raw = encode(*frames, last=last)
    saved = 0
    if last and frames and isinstance(frames[-1], Stream):
        saved = varint_size(len(frames[-1].data))  # the omitted length field
    assert len(raw) == sum(encoded_size(f) for f in frames) - saved
    expected = merge_padding(frames)
    assert parse_frames(raw) == expected
    for f in frames:
        assert encoded_size(f) == len(encode(f))


@pytest.mark.fuzz
@fuzz_settings(1000)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_frame_error(raw: bytes) -> None:
    try:
        frames = parse_frames(raw)
    except FrameError:
        return
    assert all(isinstance(f, get_args(Frame)) for f in frames)


@pytest.mark.fuzz
@fuzz_settings(500)
@given(st.lists(frames_st, min_size=1, max_size=5), st.data())
def test_mutated_frames_only_raise_frame_error(frames: list[Frame], data: st.DataObject) -> None:
    raw = bytearray(encode(*frames))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        with contextlib.suppress(FrameError):
            parse_frames(candidate)
