from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay_httpx import Address, AddressError

networks = st.integers(0, 0xFFFF)
nodes = st.integers(0, 0xFFFF_FFFF)


def test_seed_example() -> None:
    a = Address.parse("1:0001.0001.0001")
    assert (a.network, a.node) == (1, 0x0001_0001)
    assert str(a) == "1:0001.0001.0001"
    assert a.host == "1-0001-0001-0001.overlay"
    assert repr(a) == "Address('1:0001.0001.0001')"
    assert a.to_bytes() == bytes.fromhex("000100010001")


def test_network_is_decimal_and_repeated_in_hex() -> None:
    a = Address(10, 0xABCD_0001)
    assert str(a) == "10:000a.abcd.0001"
    assert Address.parse("10:000A.ABCD.0001") == a
    assert Address.from_host("10-000a-abcd-0001.overlay") == a


@given(networks, nodes)
def test_round_trips(network: int, node: int) -> None:
    a = Address(network, node)
    assert Address.parse(str(a)) == a
    assert Address.parse(str(a).upper()) == a
    assert Address.from_host(a.host) == a
    assert Address.from_host(a.host.upper()) == a
    assert Address.from_bytes(a.to_bytes()) == a
    assert Address.from_int(int(a)) == a
    assert pickle.loads(pickle.dumps(a)) == a
    assert hash(Address(network, node)) == hash(a)


@given(networks, nodes, networks, nodes)
def test_order_is_by_network_then_node(n1: int, h1: int, n2: int, h2: int) -> None:
    a, b = Address(n1, h1), Address(n2, h2)
    assert (a < b) == ((n1, h1) < (n2, h2))
    assert (a == b) == ((n1, h1) == (n2, h2))
    assert sorted([b, a]) == sorted([a, b])


def test_immutable() -> None:
    a = Address(1, 1)
    with pytest.raises(AttributeError):
        a._network = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del a._node


def test_special_addresses() -> None:
    assert Address.unspecified().is_unspecified
    assert str(Address.unspecified()) == "0:0000.0000.0000"
    b = Address.broadcast(7)
    assert b.is_broadcast
    assert str(b) == "7:0007.ffff.ffff"
    assert not Address(1, 1).is_broadcast
    assert not Address(1, 1).is_unspecified


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "expected N:NNNN.HHHH.LLLL"),
        ("1", "expected N:NNNN.HHHH.LLLL"),
        ("1:0001.0001", "expected N:NNNN.HHHH.LLLL"),
        ("1:0001.0001.0001.0001", "expected N:NNNN.HHHH.LLLL"),
        ("1:001.0001.0001", "expected N:NNNN.HHHH.LLLL"),
        ("1:0001.0001.000g", "expected N:NNNN.HHHH.LLLL"),
        ("1-0001-0001-0001", "expected N:NNNN.HHHH.LLLL"),
        ("2:0001.0001.0001", "must repeat network 2"),
        ("70000:1170.0000.0001", "exceeds 65535"),
        ("-1:ffff.0001.0001", "expected N:NNNN.HHHH.LLLL"),
        (" 1 :0001.0001.0001", "expected N:NNNN.HHHH.LLLL"),
    ],
)
def test_bad_text(text: str, match: str) -> None:
    with pytest.raises(AddressError, match=match) as info:
        Address.parse(text)
    assert repr(text) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("host", "match"),
    [
        ("1-0001-0001-0001", "expected N-NNNN-HHHH-LLLL.overlay"),
        ("1-0001-0001-0001.example", "expected N-NNNN-HHHH-LLLL.overlay"),
        ("1:0001.0001.0001.overlay", "expected N-NNNN-HHHH-LLLL.overlay"),
        ("1-0001-0001.overlay", "expected N-NNNN-HHHH-LLLL.overlay"),
        ("3-0001-0001-0001.overlay", "must repeat network 3"),
        ("llm.overlay", "expected N-NNNN-HHHH-LLLL.overlay"),
    ],
)
def test_bad_host(host: str, match: str) -> None:
    with pytest.raises(AddressError, match=match) as info:
        Address.from_host(host)
    assert repr(host) in str(info.value)


def test_trailing_dot_host_is_accepted() -> None:
    assert Address.from_host("1-0001-0001-0001.overlay.") == Address(1, 0x10001)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 0), "network -1 out of range"),
        ((0x10000, 0), "network 65536 out of range"),
        ((0, -1), "out of range"),
        ((0, 1 << 32), "out of range"),
        (("1", 0), "must be an int"),
        ((1, True), "must be an int"),
    ],
)
def test_bad_ints(args: tuple[object, object], match: str) -> None:
    with pytest.raises(AddressError, match=match):
        Address(*args)  # type: ignore[arg-type]


def test_bad_wire_forms() -> None:
    with pytest.raises(AddressError, match="6 bytes"):
        Address.from_bytes(b"\x00" * 5)
    with pytest.raises(AddressError, match="out of range"):
        Address.from_int(1 << 48)
    with pytest.raises(AddressError, match="expected an address string"):
        Address.parse(123)  # type: ignore[arg-type]


def test_not_equal_to_other_types() -> None:
    assert Address(1, 1) != "1:0001.0000.0001"
    with pytest.raises(TypeError):
        _ = Address(1, 1) < "x"  # type: ignore[operator]
