"""Handshake keys: an identity binding is checked once per key and a forgery never passes;
an ephemeral key made ahead of time serves exactly one handshake."""

from __future__ import annotations

import pytest
from _build import patches_the_core

from overlay_httpx import Address, Identity
from overlay_httpx._exceptions import FrameError
from overlay_httpx._protocol import _sessions
from overlay_httpx._protocol._endpoint import Endpoint
from overlay_httpx._protocol._packet import BIND_LABEL, HandshakeInit, HandshakeResponse
from overlay_httpx._protocol._sessions import MAX_VERIFIED_BINDINGS, bound_identity


def _binding(identity: Identity) -> tuple[bytes, bytes, bytes]:
    x25519 = identity.public.x25519
    return x25519, identity.public.ed25519, identity.sign(BIND_LABEL + x25519)


def test_a_good_binding_is_checked_once_and_remembered() -> None:
    me = Identity.generate()
    triple = _binding(me)
    first = bound_identity(*triple)
    assert first == me.public
    assert _sessions._verified[triple] is first
    assert bound_identity(*triple) is first


def test_a_forged_binding_fails_every_time_and_is_not_remembered() -> None:
    me, mallory = Identity.generate(), Identity.generate()
    x25519, ed25519, signature = _binding(me)
    forged = (mallory.public.x25519, ed25519, signature)  # my signature on another key
    before = len(_sessions._verified)
    for _ in range(2):
        with pytest.raises(FrameError, match="binding signature is invalid"):
            bound_identity(*forged)
    assert forged not in _sessions._verified
    bound_identity(x25519, ed25519, signature)  # the real one still passes afterwards
    with pytest.raises(FrameError, match="binding signature is invalid"):
        bound_identity(x25519, ed25519, signature[:-1] + bytes([signature[-1] ^ 1]))
    assert len(_sessions._verified) <= before + 1


@patches_the_core
def test_the_memory_of_bindings_is_bounded_and_forgets_the_oldest_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_sessions, "MAX_VERIFIED_BINDINGS", 8)
    monkeypatch.setattr(_sessions, "_verified", {})
    triples = [_binding(Identity.generate()) for _ in range(12)]
    for triple in triples:
        bound_identity(*triple)
    assert list(_sessions._verified) == triples[4:]
    assert MAX_VERIFIED_BINDINGS == 4096  # the real bound


def _initiation_ephemeral(client: Endpoint, server: Endpoint, now: float) -> bytes:
    client.connect(server.public, ("10.0.0.2", 5000), now)
    [(datagram, _)] = client.datagrams_to_send(now)
    return HandshakeInit.decode(datagram, server.keys.mac1_key).noise[:32]


def test_a_prepared_ephemeral_key_serves_one_handshake_only() -> None:
    server = Endpoint(Identity.generate(), Address(1, 2))
    seen = set()
    for i in range(3):
        client = Endpoint(Identity.generate(), Address(1, 1))
        client.keys.prepare()
        client.keys.prepare()  # idempotent: one spare at a time
        [spare] = client.keys.spare
        assert _initiation_ephemeral(client, server, float(i)) == spare.public
        assert client.keys.spare == []  # used up; the next handshake makes its own
        seen.add(spare.public)
    unprepared = Endpoint(Identity.generate(), Address(1, 1))
    seen.add(_initiation_ephemeral(unprepared, server, 5.0))
    assert len(seen) == 4


def test_the_responder_answers_with_its_prepared_ephemeral_key() -> None:
    server = Endpoint(Identity.generate(), Address(1, 2))
    server.listen(80)
    client = Endpoint(Identity.generate(), Address(1, 1))
    client.connect(server.public, ("10.0.0.2", 5000), 1.0)
    [(init, _)] = client.datagrams_to_send(1.0)
    server.keys.prepare()
    [spare] = server.keys.spare
    server.receive_datagram(init, ("10.0.0.1", 4000), 1.0)
    [(response, _)] = server.datagrams_to_send(1.0)
    assert HandshakeResponse.decode(response, client.keys.mac1_key).noise[:32] == spare.public
    assert server.keys.spare == []
