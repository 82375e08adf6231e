"""Work no request waits for runs once the node is quiet (overlay_httpx._node._idle)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

import anyio
import pytest

from overlay_httpx._node._idle import IdleWork

pytestmark = pytest.mark.anyio


async def test_work_runs_once_per_key_after_a_quiet_moment() -> None:
    ran: list[tuple[str, float]] = []
    async with anyio.create_task_group() as tg:

        def spawn(work: Awaitable[None]) -> None:
            tg.start_soon(lambda: work)

        idle = IdleWork(anyio.current_time, spawn, quiet=0.02, longest=5.0)
        idle.last_activity = start = anyio.current_time()
        idle.add("a", lambda: ran.append(("a", anyio.current_time())))
        idle.add("a", lambda: ran.append(("a again", anyio.current_time())))
        idle.add("b", lambda: ran.append(("b", anyio.current_time())))
        await idle.wait()
    assert [name for name, _ in ran] == ["a", "b"]
    assert ran[0][1] >= start + 0.02


async def test_activity_postpones_work_but_no_longer_than_longest() -> None:
    ran: list[float] = []
    busy_until = anyio.current_time() + 0.5
    activity: list[float] = []
    async with anyio.create_task_group() as tg:

        def spawn(work: Awaitable[None]) -> None:
            tg.start_soon(lambda: work)

        patient = IdleWork(anyio.current_time, spawn, quiet=0.05, longest=10.0)
        hurried = IdleWork(anyio.current_time, spawn, quiet=0.05, longest=0.1)
        patient.add("w", lambda: ran.append(anyio.current_time()))
        hurried.add("w", lambda: ran.append(-anyio.current_time()))
        while anyio.current_time() < busy_until:  # a datagram every millisecond
            now = anyio.current_time()
            activity.append(now)
            patient.last_activity = hurried.last_activity = now
            await anyio.sleep(0.001)
        await patient.wait()
    hurried_at, patient_at = -min(ran), max(ran)
    assert hurried_at < busy_until  # `longest` reached while still busy
    # Only once quiet: the last activity it could have seen was `quiet` before it ran.
    seen = max(t for t in activity if t <= patient_at)
    assert patient_at >= seen + 0.05


async def test_work_added_later_or_by_work_runs_too() -> None:
    ran: list[str] = []
    async with anyio.create_task_group() as tg:

        def spawn(work: Awaitable[None]) -> None:
            tg.start_soon(lambda: work)

        idle = IdleWork(anyio.current_time, spawn, quiet=0.0)
        idle.add("first", lambda: idle.add("queued by work", lambda: ran.append("second")))
        await idle.wait()
        assert ran == ["second"]
        idle.add("after a batch", lambda: ran.append("third"))
        await idle.wait()
    assert ran == ["second", "third"]


async def test_work_left_by_a_cancelled_runner_runs_with_the_next_add() -> None:
    ran: list[str] = []
    async with anyio.create_task_group() as tg:
        scopes: list[anyio.CancelScope] = []

        async def in_scope(work: Awaitable[None]) -> None:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                await work

        def spawn(work: Awaitable[None]) -> None:
            tg.start_soon(in_scope, work)

        idle = IdleWork(anyio.current_time, spawn, quiet=60.0, longest=60.0)
        idle.add("left", lambda: ran.append("left"))
        await anyio.wait_all_tasks_blocked()
        scopes[0].cancel()  # the runner dies before the work's time
        await anyio.wait_all_tasks_blocked()
        assert ran == []
        idle._quiet = idle._longest = 0.0
        idle.add("next", lambda: ran.append("next"))
        await idle.wait()
    assert ran == ["left", "next"]


async def test_a_failing_piece_is_logged_and_the_rest_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    async with anyio.create_task_group() as tg:

        def spawn(work: Awaitable[None]) -> None:
            tg.start_soon(lambda: work)

        idle = IdleWork(anyio.current_time, spawn, quiet=0.0)
        with caplog.at_level(logging.ERROR, logger="overlay_httpx"):
            idle.add("broken", broken)
            idle.add("fine", lambda: ran.append("fine"))
            await idle.wait()
    assert ran == ["fine"]
    assert "idle work 'broken' failed" in caplog.text


@pytest.mark.parametrize("quiet", [True, False])
async def test_a_node_makes_its_next_handshake_key_once_quiet(
    quiet: bool,
    overlay_node_factory,  # type: ignore[no-untyped-def]
) -> None:
    a, b = await overlay_node_factory(), await overlay_node_factory()
    assert a._endpoint.keys.spare  # made at start
    if not quiet:
        a._idle._quiet = a._idle._longest = 3600.0  # never, within this test
    listener = await b.listen(80)

    async def echo(stream: Any) -> None:
        await stream.send(await stream.receive())

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        stream = await a.connect(b.address, 80)
        await stream.send(b"hi")  # a stream reaches the peer with its first bytes
        assert await stream.receive() == b"hi"
        if quiet:
            await a._idle.wait()
            await b._idle.wait()
            assert a._endpoint.keys.spare  # the one the handshake used, made again
            assert b._endpoint.keys.spare
        else:
            assert not a._endpoint.keys.spare  # the handshake took it ...
            assert "ephemeral key" in a._idle._work  # ... the next waits for a quiet node
        await stream.aclose()
        tg.cancel_scope.cancel()
