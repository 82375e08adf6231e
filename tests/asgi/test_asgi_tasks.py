"""Request tasks: bare asyncio tasks on asyncio, the task group's on trio; both are waited
for, cancelled together, and a failure of one is logged, not lost."""

from __future__ import annotations

import logging

import anyio
import pytest

from overlay_httpx._asgi._tasks import RequestTasks

pytestmark = pytest.mark.anyio


async def test_every_request_task_is_waited_for(anyio_backend: str) -> None:
    done: list[int] = []
    gates = [anyio.Event() for _ in range(3)]

    async def request(i: int) -> None:
        await gates[i].wait()
        done.append(i)

    async with anyio.create_task_group() as group:
        tasks = RequestTasks(group)
        for i in range(3):
            tasks.start(request, i)
        assert len(tasks) == (3 if anyio_backend == "asyncio" else 0)
        for gate in reversed(gates):
            gate.set()
        await tasks.wait()
        if anyio_backend == "asyncio":
            assert sorted(done) == [0, 1, 2]
    assert sorted(done) == [0, 1, 2]


async def test_cancel_reaches_every_request_task(anyio_backend: str) -> None:
    cleaned: list[int] = []
    started = anyio.Event()

    async def request(i: int) -> None:
        try:
            started.set()
            await anyio.sleep_forever()
        finally:
            cleaned.append(i)

    async with anyio.create_task_group() as group:
        tasks = RequestTasks(group)
        tasks.start(request, 1)
        tasks.start(request, 2)
        await started.wait()
        tasks.cancel()
        group.cancel_scope.cancel()  # what `Connection.abort` does too
        with anyio.CancelScope(shield=True):
            await tasks.wait()
    assert sorted(cleaned) == [1, 2]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_failing_bare_task_is_logged_and_waited_for(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def request(i: int) -> None:
        await anyio.lowlevel.checkpoint()
        raise RuntimeError(f"bug {i}")

    async with anyio.create_task_group() as group:
        tasks = RequestTasks(group)
        with caplog.at_level(logging.ERROR, logger="overlay_httpx"):
            tasks.start(request, 7)
            with anyio.fail_after(5):
                await tasks.wait()
    assert "an HTTP/2 request task failed" in caplog.text
    assert "bug 7" in caplog.text


async def test_cancelling_respects_shields_and_repeats_like_a_task_group() -> None:
    log: list[str] = []
    started = anyio.Event()

    async def shielded(i: int) -> None:
        try:
            started.set()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.01)  # cleanup that must not be cut short
            log.append("cleanup done")

    async def swallows(i: int) -> None:
        for step in range(3):
            try:
                await anyio.sleep(10)
                log.append(f"slept {step}")
            except BaseException:  # an app that swallows cancellation
                log.append(f"cancelled {step}")

    async with anyio.create_task_group() as group:
        tasks = RequestTasks(group)
        tasks.start(shielded, 1)
        tasks.start(swallows, 2)
        await started.wait()
        await anyio.wait_all_tasks_blocked()
        tasks.cancel()
        with anyio.fail_after(5):  # every later await of the swallower is cancelled too
            await tasks.wait()
        group.cancel_scope.cancel()
    assert "cleanup done" in log
    assert [e for e in log if "0" in e or "1" in e or "2" in e] == [
        "cancelled 0",
        "cancelled 1",
        "cancelled 2",
    ]


async def test_a_request_cancelled_before_its_first_step_still_runs_its_cleanup() -> None:
    cleaned: list[int] = []

    async def request(i: int) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cleaned.append(i)

    async with anyio.create_task_group() as group:
        tasks = RequestTasks(group)
        tasks.start(request, 1)
        tasks.cancel()  # before the task ran at all
        tasks.start(request, 2)  # and one started after the cancel
        with anyio.fail_after(5):
            await tasks.wait()
        group.cancel_scope.cancel()
    assert sorted(cleaned) == [1, 2]
