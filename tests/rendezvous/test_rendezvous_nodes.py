"""Nodes and an in-process rendezvous on 127.0.0.1: registration, discovery, expiry,
restarts with the SQLite file, and impersonation attempts."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.abc
import pytest

from overlay_httpx import (
    Address,
    AddressTaken,
    HostnameTaken,
    Identity,
    LocalProtocolError,
    Node,
    NotRegistered,
    Rendezvous,
    RendezvousUnavailable,
    UnknownPeer,
)

pytestmark = pytest.mark.anyio


async def test_nodes_register_and_find_each_other_by_tag_name_and_address() -> None:
    async with (
        Rendezvous() as rv,
        Node(
            Identity.generate(),
            rendezvous=rv.spec,
            tags=["model-service", "llm"],
            hostname="llm",
        ) as llm,
        Node(Identity.generate(), rendezvous=rv.spec, tags=["model-service", "stt"]) as stt,
        Node(Identity.generate(), rendezvous=rv.spec) as orchestrator,
    ):
        stats = llm.statistics()
        assert stats.registered
        assert stats.observed_endpoint == llm.endpoint
        found = await orchestrator.find_by_tag("model-service")
        assert sorted(r.address for r in found) == sorted([llm.address, stt.address])
        assert [r.address for r in await orchestrator.find_by_tag("llm")] == [llm.address]
        assert await orchestrator.find_by_tag("nobody") == []
        record = await orchestrator.resolve("llm")
        assert record.address == llm.address
        assert record.identity == llm.public
        assert record.endpoint == llm.endpoint
        assert record.tags == ("llm", "model-service")
        assert (await orchestrator.lookup(stt.address)).identity == stt.public
        with pytest.raises(NotRegistered, match="nope"):
            await orchestrator.resolve("nope")
        await stt.set_tags(["model-service", "tts"])
        assert [r.address for r in await orchestrator.find_by_tag("tts")] == [stt.address]
        # Discovery is enough to open a stream: no add_peer anywhere.
        listener = await llm.listen(80)
        async with anyio.create_task_group() as group:
            group.start_soon(_answer_once, listener)
            stream = await orchestrator.connect(llm.address, 80)
            await stream.send(b"ping")
            assert await stream.receive() == b"PING"
        assert rv.statistics().connected == 3


async def _answer_once(listener) -> None:  # type: ignore[no-untyped-def]
    stream = await listener.accept()
    await stream.send((await stream.receive()).upper())


async def test_bare_host_port_learns_the_rendezvous_key_on_first_use() -> None:
    async with Rendezvous() as rv:
        host, port = rv.endpoint
        async with Node(Identity.generate(), rendezvous=f"{host}:{port}", tags=["x"]) as node:
            assert node.statistics().registered
            assert [r.address for r in await node.find_by_tag("x")] == [node.address]


async def test_a_pinned_key_that_does_not_match_is_never_used() -> None:
    async with Rendezvous() as rv, Rendezvous() as impostor:
        host, port = impostor.endpoint
        spec = f"{rv.public}@{host}:{port}"  # rv's key, the impostor's endpoint
        async with Node(Identity.generate(), rendezvous=spec, handshake_timeout=1.0) as node:
            assert not node.statistics().registered
            with pytest.raises(RendezvousUnavailable):
                await node.find_by_tag("x")
            assert impostor.statistics().connected == 0


async def test_an_address_belongs_to_the_first_key_that_registers_it() -> None:
    async with Rendezvous() as rv:
        owner = Identity.generate()
        async with Node(owner, rendezvous=rv.spec) as first:
            address = first.address
        with pytest.raises(AddressTaken, match=str(address)):
            async with Node(Identity.generate(), address=address, rendezvous=rv.spec):
                pass  # pragma: no cover
        async with Node(owner, rendezvous=rv.spec) as again:  # the owner keeps it across restarts
            assert again.statistics().registered
            assert again.address == address


async def test_a_hostname_is_unique_among_live_nodes() -> None:
    async with Rendezvous() as rv:
        async with Node(Identity.generate(), rendezvous=rv.spec, hostname="llm"):
            with pytest.raises(HostnameTaken, match="llm"):
                async with Node(Identity.generate(), rendezvous=rv.spec, hostname="llm"):
                    pass  # pragma: no cover
        # The first node left (it unregisters on close): the name is free again.
        async with Node(Identity.generate(), rendezvous=rv.spec, hostname="llm") as second:
            assert (await second.resolve("llm")).address == second.address


async def test_records_expire_after_the_ttl() -> None:
    now = [1000.0]
    async with (
        Rendezvous(ttl=30.0, clock=lambda: now[0]) as rv,
        Node(Identity.generate(), rendezvous=rv.spec, tags=["t"]) as a,
        Node(Identity.generate(), rendezvous=rv.spec) as b,
    ):
        assert [r.address for r in await b.find_by_tag("t")] == [a.address]
        now[0] += 31.0  # nobody heartbeat in 31 "seconds"
        assert await b.find_by_tag("t") == []
        with pytest.raises(UnknownPeer, match="no live record"):
            await b.connect(a.address, 80)


async def test_nodes_re_register_by_themselves_after_the_rendezvous_restarts(
    tmp_path: Path,
) -> None:
    identity = Identity.generate()
    db = tmp_path / "registry.db"
    stop, stopped = anyio.Event(), anyio.Event()

    async def first_life(*, task_status: anyio.abc.TaskStatus[Rendezvous]) -> None:
        async with Rendezvous(identity, db=db, ttl=3.0) as rv:
            task_status.started(rv)
            await stop.wait()
        stopped.set()

    async with anyio.create_task_group() as group:
        rv = await group.start(first_life)
        bind, spec = rv.endpoint, rv.spec
        async with (
            Node(Identity.generate(), rendezvous=spec, tags=["model-service"]) as a,
            Node(Identity.generate(), rendezvous=spec) as b,
        ):
            addresses = {a.address, b.address}
            stop.set()
            await stopped.wait()
            async with Rendezvous(identity, db=db, bind=bind, ttl=3.0) as again:
                # The records survived in SQLite...
                assert {r.address for r in again.store.all(_wall())} == addresses
                # ...and both nodes come back on their own.
                with anyio.fail_after(15):
                    await again.wait_for(a.address)
                    await again.wait_for(b.address)
                assert [r.address for r in await b.find_by_tag("model-service")] == [a.address]


def _wall() -> float:
    import time

    return time.time()


async def test_node_options_for_discovery_are_checked() -> None:
    with pytest.raises(LocalProtocolError, match="rendezvous"):
        Node(Identity.generate(), tags=["x"])
    with pytest.raises(LocalProtocolError, match="host:port"):
        Node(Identity.generate(), rendezvous="nowhere")
    with pytest.raises(LocalProtocolError, match="Bad_Tag"):
        Node(Identity.generate(), rendezvous="127.0.0.1:9", tags=["Bad_Tag"])
    with pytest.raises(LocalProtocolError, match="hostname"):
        Node(Identity.generate(), rendezvous="127.0.0.1:9", hostname="x.tag")
    async with Node(Identity.generate()) as plain:
        with pytest.raises(RendezvousUnavailable, match="no rendezvous"):
            await plain.find_by_tag("x")
        with pytest.raises(UnknownPeer, match="rendezvous"):
            await plain.connect(Address(1, 5), 80)


async def test_one_broken_session_never_takes_the_registry_down() -> None:
    from overlay_httpx._rendezvous import REGISTRY_PORT
    from overlay_httpx._rendezvous._messages import encode, request

    async with (
        Rendezvous() as rv,
        Node(Identity.generate(), rendezvous=rv.spec, tags=["t"]) as node,
    ):
        # A second control stream from the same node registers again: the first
        # session is closed under its pending receive.
        extra = await node.connect(rv.address, REGISTRY_PORT)
        await extra.send(encode(request(1, "register", tags=["t"])))
        await extra.receive()
        # Many records for one tag: the answer is capped to fit one message.
        async with Node(Identity.generate(), rendezvous=rv.spec) as other:
            for i in range(150):
                rv.store.claim(_fake(i).address, _fake(i).identity)
                rv.store.put(_fake(i))
            found = await other.find_by_tag("t")
            assert 0 < len(found) <= 100
            assert (await other.lookup(node.address)).address == node.address


def _fake(i: int):  # type: ignore[no-untyped-def]
    import time

    from overlay_httpx import Address
    from overlay_httpx._rendezvous import NodeRecord

    return NodeRecord(
        address=Address(1, 0x00100000 + i),
        identity=_KEYS[i],
        endpoint=("127.0.0.1", 1000 + i),
        local_endpoints=(),
        tags=("t",),
        hostname=None,
        last_seen=time.time(),
    )


_KEYS = [Identity.generate().public for _ in range(150)]


async def test_an_address_derived_from_a_key_cannot_be_squatted() -> None:
    victim_id = Identity.generate()
    async with Rendezvous() as rv:
        from overlay_httpx._node import default_address

        stolen = default_address(victim_id.public)
        async with Node(Identity.generate(), address=stolen, rendezvous=rv.spec):
            assert (await _lookup(rv, stolen)).identity != victim_id.public  # squatted...
            async with Node(victim_id, rendezvous=rv.spec) as victim:
                assert victim.statistics().registered  # ...until the owner shows up
                assert (await _lookup(rv, stolen)).identity == victim_id.public


async def _lookup(rv: Rendezvous, address: Address):  # type: ignore[no-untyped-def]
    import time

    record = rv.store.get(address, time.time())
    assert record is not None
    return record
