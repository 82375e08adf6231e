"""The h2 work-arounds stay in force, and the HPACK caches give what hpack gives."""

from __future__ import annotations

import random

import hpack
import pytest
from h2.connection import ConnectionInputs, ConnectionState, H2Connection
from h2.stream import StreamInputs
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame

import overlay_httpx._http._client  # noqa: F401  (installs the work-arounds)
from overlay_httpx import _h2compat


def test_data_frame_repr_does_not_copy_the_payload() -> None:
    frame = DataFrame(1, b"x" * 1_000_000)
    text = repr(frame)
    assert "1000000 bytes of data" in text
    assert len(text) < 100


# -- HPACK block caches --------------------------------------------------------------------


def _cached_pair() -> tuple[hpack.Encoder, hpack.Decoder]:
    """A caching encoder and decoder, as `cache_hpack` gives one h2 connection."""
    conn = H2Connection()
    _h2compat.cache_hpack(conn)
    assert type(conn.encoder).__name__ == "_CachingEncoder"
    assert type(conn.decoder).__name__ == "_CachingDecoder"
    return conn.encoder, conn.decoder


def _header_lists() -> list[list[tuple[bytes, bytes]]]:
    """Repeats (cache hits), new values (table additions) and evictions, deterministically."""
    rng = random.Random(7)
    names = [b":method", b":path", b"content-type", b"x-a", b"x-b", b"user-agent"]
    values = [b"GET", b"/", b"/v1/echo", b"application/json", b"x" * 40, b"y" * 900, b"z"]
    lists = []
    for _ in range(400):
        size = rng.randint(1, 6)
        lists.append([(rng.choice(names), rng.choice(values)) for _ in range(size)])
        if rng.random() < 0.5:
            lists.append(list(lists[-1]))
    return lists


def test_cached_hpack_blocks_are_what_hpack_makes() -> None:
    encoder, decoder = _cached_pair()
    plain_encoder, plain_decoder = hpack.Encoder(), hpack.Decoder()
    for i, headers in enumerate(_header_lists()):
        if i % 97 == 96:  # a table size change (the peer's SETTINGS) now and then
            size = 4096 if i % 2 else 1024
            encoder.header_table_size = plain_encoder.header_table_size = size
        block = encoder.encode(headers)
        assert block == plain_encoder.encode(headers, huffman=False)
        decoded = decoder.decode(block, raw=True)
        assert decoded == plain_decoder.decode(block, raw=True) == headers
    # the caches were used
    assert encoder._blocks  # type: ignore[attr-defined]
    assert decoder._blocks  # type: ignore[attr-defined]


def test_literals_leave_without_huffman_coding_and_any_decoder_reads_them() -> None:
    encoder, _ = _cached_pair()
    headers = [(b":path", b"/v1/generate"), (b"x-request-id", b"4f1c2a9e")]
    block = encoder.encode(headers)  # h2 asks for Huffman; it is not used
    assert b"/v1/generate" in block
    assert b"4f1c2a9e" in block
    assert hpack.Decoder().decode(block, raw=True) == headers


def test_cached_decode_returns_a_new_list_each_time() -> None:
    encoder, decoder = _cached_pair()
    headers = [(b":method", b"GET"), (b":path", b"/")]
    block = encoder.encode(headers)
    first = decoder.decode(block, raw=True)
    assert isinstance(first, list)
    first.append((b"x", b"y"))
    assert decoder.decode(block, raw=True) == headers


def test_never_indexed_fields_stay_out_of_the_caches() -> None:
    encoder, decoder = _cached_pair()
    secret = [(b":method", b"GET"), hpack.NeverIndexedHeaderTuple(b"authorization", b"s3cret")]
    for _ in range(3):
        block = encoder.encode(secret)
        assert decoder.decode(block, raw=True) == secret
    kept = repr(encoder._blocks) + repr(decoder._blocks)  # type: ignore[attr-defined]
    assert b"s3cret".decode() not in kept
    sensitive = [(b":method", b"GET"), (b"cookie", b"c", True)]
    for _ in range(3):
        encoder.encode(sensitive)
    assert "cookie" not in repr(encoder._blocks)  # type: ignore[attr-defined]


def test_hpack_caches_are_bounded() -> None:
    encoder, decoder = _cached_pair()
    for i in range(500):
        headers = [(b":method", b"GET"), (b"x-n", str(i % 200).encode())]
        decoder.decode(encoder.encode(headers), raw=True)
    assert len(encoder._blocks) <= 32  # type: ignore[attr-defined]
    assert len(decoder._blocks) <= 32  # type: ignore[attr-defined]


def test_a_cached_block_still_enforces_the_header_list_limit() -> None:
    encoder, decoder = _cached_pair()
    headers = [(b":method", b"GET"), (b"x-big", b"v" * 500)]
    block = encoder.encode(headers)
    decoder.decode(block, raw=True)
    block = encoder.encode(headers)  # indexed now: the same block each time
    decoder.decode(block, raw=True)
    decoder.max_header_list_size = 100
    with pytest.raises(hpack.OversizedHeaderListError):
        decoder.decode(block, raw=True)


# -- process-wide cuts ---------------------------------------------------------------------


def test_frame_reprs_do_not_serialise_the_frame() -> None:
    frame = HeadersFrame(3)
    frame.data = b"h" * 100_000
    text = repr(frame)
    assert "HeadersFrame" in text
    assert "stream_id=3" in text
    assert len(text) < 100


def test_frame_flags_are_still_checked() -> None:
    frame = DataFrame(1)
    frame.flags.add("END_STREAM")
    assert "END_STREAM" in frame.flags
    with pytest.raises(ValueError, match="Unexpected flag"):
        frame.flags.add("ACK")
    assert "ACK" in SettingsFrame(0, flags=["ACK"]).flags


def test_state_machine_enums_hash_by_identity_and_still_work() -> None:
    for enum in (ConnectionState, ConnectionInputs, StreamInputs):
        member = next(iter(enum))
        assert hash(member) == object.__hash__(member)
    client = H2Connection()
    client.initiate_connection()
    request = [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/")]
    client.send_headers(1, request)
    assert client.state_machine.state is ConnectionState.CLIENT_OPEN
    assert client.data_to_send()
