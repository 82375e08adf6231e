"""Work that no request waits for, run once the node has been quiet for a moment.

Making the next handshake's ephemeral key or the next HTTP/2 connection's state
ahead of time takes it off that handshake's or connection's path, but doing it
right after our own datagram leaves puts it on the peer's path instead whenever
the peer shares our CPU (services on one host: the kernel runs the woken peer
on the sender's core, and our leftover work delays its answer being read). So
such work waits until no datagram has come or gone for `QUIET` seconds, or
`LONGEST` at the most under steady traffic.
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
        self._done: anyio.Event | None = None
        self.last_activity = clock()  # the node sets it at each send and receive

    def add(self, key: Hashable, work: Callable[[], object]) -> None:
        """Run `work` once the node is quiet; a second `add` with the same key is ignored."""
        if key in self._work:
            return
        self._work[key] = work
        if len(self._work) == 1:
            self._spawn(self._run())

    async def _run(self) -> None:
        clock = self._clock
        latest = clock() + self._longest
        while True:
            now = clock()
            wait = min(self.last_activity + self._quiet, latest) - now
            if wait <= 0:
                break
            await anyio.sleep(wait)
        work, self._work = self._work, {}
        for key, run in work.items():
            try:
                run()
            except Exception:  # one failure must not cost the rest
                logger.exception("idle work %r failed", key)
        done, self._done = self._done, None
        if done is not None:
            done.set()

    async def wait(self) -> None:
        """Return once the work queued now has run (at once if there is none)."""
        if not self._work:
            return
        if self._done is None:
            self._done = anyio.Event()
        await self._done.wait()
