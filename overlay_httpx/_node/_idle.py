"""Work that no request waits for, run once the node has been quiet for a moment.

Making the next handshake's ephemeral key or the next HTTP/2 connection's state
ahead of time takes it off that handshake's or connection's path, but doing it
right after our own datagram leaves puts it on the peer's path instead whenever
the peer shares our CPU (services on one host: the kernel may run the woken
peer on the sender's core, and our leftover work then delays its answer being
read). So such work waits until the node has flushed nothing (no datagram
received or sent, no timer) for `QUIET` seconds, or `LONGEST` at the most.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Final

import anyio

__all__ = ["LONGEST", "QUIET", "IdleWork"]

logger = logging.getLogger("overlay_httpx")

QUIET: Final = 0.005
LONGEST: Final = 1.0


class IdleWork:
    """A queue of callables, keyed so that each piece of work is queued once."""

    def __init__(
        self,
        clock: Callable[[], float],
        spawn: Callable[[Awaitable[None]], None],
        *,
        quiet: float = QUIET,
        longest: float = LONGEST,
    ) -> None:
        self._clock = clock
        self._spawn = spawn
        self._quiet = quiet
        self._longest = longest
        self._work: dict[Hashable, Callable[[], object]] = {}
        self._running = False
        self._done: anyio.Event | None = None
        self.last_activity = clock()  # the node sets it at each flush

    def add(self, key: Hashable, work: Callable[[], object]) -> None:
        """Run `work` once the node is quiet; a second `add` with the same key is ignored."""
        self._work.setdefault(key, work)
        self._start()

    def _start(self) -> None:
        if self._running or not self._work:
            return
        self._running = True
        try:
            self._spawn(self._run())
        except BaseException:
            self._running = False
            raise

    async def _run(self) -> None:
        try:
            while self._work:  # work that the work queued goes in the next batch
                await self._until_quiet()
                work, self._work = self._work, {}
                for key, run in work.items():
                    try:
                        run()
                    except Exception:  # one failure must not cost the rest
                        logger.exception("idle work %r failed", key)
        finally:  # cancelled (the node is closing): the work stays queued, unrun
            self._running = False
            done, self._done = self._done, None
            if done is not None:
                done.set()

    async def _until_quiet(self) -> None:
        clock = self._clock
        latest = clock() + self._longest
        step = self._quiet
        while True:
            wait = min(self.last_activity + self._quiet, latest) - clock()
            if wait <= 0:
                return
            # Under steady traffic, look again less and less often.
            await anyio.sleep(max(wait, min(step, latest - clock())))
            step *= 2

    async def wait(self) -> None:
        """Return once the work queued now has run (at once if there is none)."""
        if not self._work:
            return
        if self._done is None:
            self._done = anyio.Event()
        done = self._done
        self._start()
        await done.wait()
