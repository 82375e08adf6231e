"""Nothing readable on the wire: application bytes, identities and addresses travel only
encrypted, the first datagram is an INIT, and the relay sees only ciphertext."""

from __future__ import annotations

from _harness import A_ADDR, B_ADDR, App, payload

from overlay_httpx import Address, Identity
from overlay_httpx._protocol._endpoint import Endpoint
from overlay_httpx._protocol._packet import TYPE_DATA, TYPE_INIT, TYPE_RESPONSE, relay_addr
from overlay_httpx.testing import Network


class Tap:
    """An endpoint wrapper that keeps every datagram its endpoint sends."""

    def __init__(self, inner: App) -> None:
        self.inner = inner
        self.sent: list[bytes] = []

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        self.inner.receive_datagram(data, addr, now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        out = self.inner.datagrams_to_send(now)
        self.sent.extend(data for data, _ in out)
        return out

    def get_timer(self) -> float | None:
        return self.inner.get_timer()

    def handle_timer(self, now: float) -> None:
        self.inner.handle_timer(now)


def _secrets(app: App) -> list[bytes]:
    public = app.endpoint.public
    return [public.ed25519, public.x25519, app.endpoint.address.to_bytes()]


def _leaks(datagrams: list[bytes], data: bytes, secrets: list[bytes]) -> list[str]:
    wire = b"".join(datagrams)
    found = [f"payload@{i}" for i in range(0, len(data) - 16, 256) if data[i : i + 16] in wire]
    found += [f"secret {s.hex()[:12]}" for s in secrets if s in wire]
    return found


def test_no_plaintext_ever_leaves_an_endpoint() -> None:
    net = Network(seed=11)
    a = App(Endpoint(Identity.generate(), Address(1, 1), timestamp_origin_ns=10**18))
    b = App(Endpoint(Identity.generate(), Address(1, 2), timestamp_origin_ns=10**18), echo=True)
    b.endpoint.listen(80)
    tap_a, tap_b = Tap(a), Tap(b)
    net.add(tap_a, A_ADDR)
    net.add(tap_b, B_ADDR)
    data = payload(200_000, seed=7)
    tunnel = a.endpoint.connect(b.endpoint.public, B_ADDR, net.now)
    sid = tunnel.open_stream(80, net.now)  # data queued before the handshake even starts
    a.write(tunnel, sid, data, fin=True)
    st = a.state(tunnel, sid)
    assert net.run(until=lambda: st.eof, timeout=60)
    assert bytes(st.received) == data  # echoed back, so both directions carried it
    assert tap_a.sent[0][0] == TYPE_INIT
    assert tap_b.sent[0][0] == TYPE_RESPONSE
    assert {d[0] for d in tap_a.sent + tap_b.sent} <= {TYPE_INIT, TYPE_RESPONSE, TYPE_DATA}
    secrets = _secrets(a) + _secrets(b)
    assert _leaks(tap_a.sent + tap_b.sent, data, secrets) == []


def test_the_relay_forwards_only_ciphertext() -> None:
    from test_relay_trust import R_ADDR, MiniRelay

    net = Network(seed=12)
    a = App(Endpoint(Identity.generate(), Address(1, 1), timestamp_origin_ns=10**18))
    b = App(Endpoint(Identity.generate(), Address(1, 2), timestamp_origin_ns=10**18), echo=True)
    b.endpoint.listen(80)
    for app in (a, b):
        app.endpoint.relay = R_ADDR
    relay = MiniRelay({a.endpoint.address: A_ADDR, b.endpoint.address: B_ADDR})
    tap = Tap(relay)  # type: ignore[arg-type]
    net.add(a, A_ADDR)
    net.add(b, B_ADDR)
    net.add(tap, R_ADDR)
    net.partition(A_ADDR, B_ADDR)
    data = payload(100_000, seed=8)
    tunnel = a.endpoint.connect(b.endpoint.public, relay_addr(b.endpoint.address), net.now)
    sid = tunnel.open_stream(80, net.now)
    a.write(tunnel, sid, data, fin=True)
    st = a.state(tunnel, sid)
    assert net.run(until=lambda: st.eof, timeout=60)
    assert len(tap.sent) > 100
    # Addresses are in the relay header by design; keys and payload never are.
    assert _leaks(tap.sent, data, [a.endpoint.public.ed25519, b.endpoint.public.ed25519]) == []
