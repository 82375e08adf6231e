"""The relay, trust policies and network keys between real nodes on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os

import anyio
import httpx
import pytest
from _filter_nat import FilteringNat

from overlay_httpx import (
    HandshakeTimeout,
    Identity,
    LocalProtocolError,
    Node,
    OverlayAttribute,
    OverlayTransport,
    Rendezvous,
    TrustPolicy,
    TrustRefused,
    serve,
)

pytestmark = pytest.mark.anyio


async def _upper(listener) -> None:  # type: ignore[no-untyped-def]
    async def handle(stream) -> None:  # type: ignore[no-untyped-def]
        digest = hashlib.sha256()
        size = 0
        async for chunk in stream:
            digest.update(chunk)
            size += len(chunk)
        await stream.send(f"{size} {digest.hexdigest()}".encode())
        await stream.aclose()

    await listener.serve(handle)


async def test_nodes_behind_strict_nats_talk_through_the_relay_which_slows_never_cuts() -> None:
    data = os.urandom(768 << 10)
    # A slow relay (1 MB/s, 32 KiB bursts, below one 64 KiB loopback datagram): the
    # body is slowed down, never cut.
    async with (
        Rendezvous(relay_rate=1_000_000, relay_burst=32_768) as rv,
        FilteringNat(rv.endpoint) as nat_a,
        FilteringNat(rv.endpoint) as nat_b,
        Node(
            Identity.generate(), rendezvous=_behind(rv, nat_a), advertise=[], direct_timeout=0.3
        ) as a,
        Node(Identity.generate(), rendezvous=_behind(rv, nat_b), advertise=[]) as b,
    ):
        assert a.statistics().observed_endpoint == nat_a.outside
        listener = await a.listen(80)
        async with anyio.create_task_group() as group:
            group.start_soon(_upper, listener)
            stream = await b.connect(a.address, 80)
            assert stream.extra(OverlayAttribute.path) == "relayed"
            await stream.send(data)
            await stream.send_eof()
            answer = await stream.receive()
            assert answer == f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()
            assert stream.extra(OverlayAttribute.path) == "relayed"
            group.cancel_scope.cancel()
        assert b.statistics().relayed_tunnels == 1
        assert nat_a.blocked > 0
        assert nat_b.blocked > 0
        stats = rv.statistics()
        assert stats.relayed_bytes > len(data)
        assert stats.relay_drops.get("rate_limited", 0) > 0  # the limit did bite


async def test_a_relayed_tunnel_moves_to_a_direct_path_when_one_works() -> None:
    async with (
        Rendezvous() as rv,
        FilteringNat(rv.endpoint) as nat,
        Node(Identity.generate(), rendezvous=_behind(rv, nat), advertise=[]) as a,
        Node(Identity.generate(), rendezvous=rv.spec, direct_timeout=0.3) as b,
    ):
        listener = await a.listen(80)
        async with anyio.create_task_group() as group:
            group.start_soon(_upper, listener)
            stream = await b.connect(a.address, 80)
            assert stream.extra(OverlayAttribute.path) == "relayed"
            # A's probes leave from its real socket, which B can answer: the
            # background agent finds the direct path and both ends move to it.
            with anyio.fail_after(10):
                await b.wait_path(a.address, "direct")
                await a.wait_path(b.address, "direct")
            await stream.send(b"after the move")
            await stream.send_eof()
            assert (await stream.receive()).startswith(b"14 ")
            group.cancel_scope.cancel()
        assert b.statistics().relayed_tunnels == 0


def _behind(rv: Rendezvous, nat: FilteringNat) -> str:
    return f"{rv.public}@127.0.0.1:{nat.inside[1]}"


async def test_http_through_the_relay_reports_the_path() -> None:
    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hello"})

    async with (
        Rendezvous() as rv,
        FilteringNat(rv.endpoint) as nat_a,
        FilteringNat(rv.endpoint) as nat_b,
        Node(
            Identity.generate(), rendezvous=_behind(rv, nat_a), advertise=[], hostname="svc"
        ) as server_node,
        Node(
            Identity.generate(), rendezvous=_behind(rv, nat_b), advertise=[], direct_timeout=0.3
        ) as client_node,
        anyio.create_task_group() as group,
    ):
        await group.start(serve, app, server_node)
        async with httpx.AsyncClient(transport=OverlayTransport(client_node)) as client:
            r = await client.get("http://svc.overlay/")
            assert r.text == "hello"
            assert r.extensions["overlay"]["path"] == "relayed"
        group.cancel_scope.cancel()


async def test_trust_by_tag_admits_tagged_callers_and_refuses_others_at_once() -> None:
    async with Rendezvous() as rv:
        policy = TrustPolicy(tags=["orchestrator"])
        async with (
            Node(Identity.generate(), rendezvous=rv.spec, trust=policy) as service,
            Node(Identity.generate(), rendezvous=rv.spec, tags=["orchestrator"]) as friend,
            Node(Identity.generate(), rendezvous=rv.spec, tags=["intruder"]) as stranger,
        ):
            listener = await service.listen(80)
            async with anyio.create_task_group() as group:
                group.start_soon(_upper, listener)
                stream = await friend.connect(service.address, 80)
                await stream.send_eof()
                assert (await stream.receive()).startswith(b"0 ")
                with anyio.fail_after(3):  # a refusal, not a 5 s handshake timeout
                    with pytest.raises(TrustRefused, match="refused"):
                        await stranger.connect(service.address, 80)
                group.cancel_scope.cancel()
            assert service.statistics().drops.get("untrusted", 0) >= 1


async def test_trust_by_key_and_by_address_without_a_rendezvous() -> None:
    friend_id, stranger_id = Identity.generate(), Identity.generate()
    async with (
        Node(friend_id) as friend,
        Node(stranger_id) as stranger,
        Node(Identity.generate(), trust=TrustPolicy(keys=[str(friend_id.public)])) as service,
    ):
        for caller in (friend, stranger):
            caller.add_peer(service.address, service.public, service.endpoint)
        await service.listen(80)
        stream = await friend.connect(service.address, 80)
        await stream.aclose()
        with pytest.raises(TrustRefused):
            await stranger.connect(service.address, 80)


async def test_only_holders_of_the_network_key_complete_a_handshake() -> None:
    key = os.urandom(32)
    async with (
        Node(Identity.generate(), network_key=key) as member,
        Node(Identity.generate(), network_key=key.hex()) as other_member,
        Node(Identity.generate(), handshake_timeout=0.5) as outsider,
    ):
        for caller in (member, outsider):
            caller.add_peer(other_member.address, other_member.public, other_member.endpoint)
        listener = await other_member.listen(80)
        async with anyio.create_task_group() as group:
            group.start_soon(_upper, listener)
            stream = await member.connect(other_member.address, 80)
            await stream.send_eof()
            assert (await stream.receive()).startswith(b"0 ")
            with pytest.raises(HandshakeTimeout):
                await outsider.connect(other_member.address, 80)
            group.cancel_scope.cancel()
        assert other_member.statistics().tunnels[0].peer_address == member.address


async def test_the_tunnel_limit_refuses_new_peers_clearly_and_keeps_serving_the_others() -> None:
    async with (
        Node(Identity.generate(), max_tunnels=1) as service,
        Node(Identity.generate()) as first,
        Node(Identity.generate()) as second,
    ):
        for caller in (first, second):
            caller.add_peer(service.address, service.public, service.endpoint)
        listener = await service.listen(80)
        async with anyio.create_task_group() as group:
            group.start_soon(_upper, listener)
            stream = await first.connect(service.address, 80)
            with anyio.fail_after(3), pytest.raises(TrustRefused, match="limit of 1 tunnels"):
                await second.connect(service.address, 80)
            service.add_peer(second.address, second.public, second.endpoint)
            with pytest.raises(LocalProtocolError, match="limit of 1 tunnels"):
                await service.connect(second.address, 80)
            await stream.send_eof()
            assert (await stream.receive()).startswith(b"0 ")  # the first peer is still served
            group.cancel_scope.cancel()
        assert service.statistics().drops["tunnel_limit"] == 1


async def test_an_address_rule_is_not_fooled_by_a_claimed_address() -> None:
    victim_id, mallory_id = Identity.generate(), Identity.generate()
    async with Rendezvous() as rv, Node(victim_id, rendezvous=rv.spec) as victim:
        address = victim.address  # derived from the victim's key
        policy = TrustPolicy(addresses=[address])
        async with (
            Node(Identity.generate(), trust=policy) as lonely_service,
            Node(Identity.generate(), rendezvous=rv.spec, trust=policy) as service,
            Node(mallory_id, address=address) as mallory,
        ):
            await lonely_service.listen(80)
            await service.listen(80)
            for target in (lonely_service, service):
                mallory.add_peer(target.address, target.public, target.endpoint)
                with anyio.fail_after(3), pytest.raises(TrustRefused):
                    await mallory.connect(target.address, 80)
            # The real owner is admitted by the same rule (its address is its key's).
            victim.add_peer(service.address, service.public, service.endpoint)
            stream = await victim.connect(service.address, 80)
            await stream.aclose()


async def test_a_chosen_address_is_believed_once_the_rendezvous_vouches_for_it() -> None:
    from overlay_httpx import Address

    chosen = Address(1, 0x00010042)
    async with Rendezvous() as rv:
        policy = TrustPolicy(addresses=[chosen])
        async with (
            Node(Identity.generate(), address=chosen, rendezvous=rv.spec) as caller,
            Node(Identity.generate(), rendezvous=rv.spec, trust=policy) as service,
        ):
            await service.listen(80)
            caller.add_peer(service.address, service.public, service.endpoint)
            with anyio.fail_after(3):  # one look-up at the rendezvous, then the retry gets in
                stream = await caller.connect(service.address, 80)
            await stream.aclose()
