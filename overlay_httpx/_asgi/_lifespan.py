"""The ASGI lifespan protocol: startup once before the first request, shutdown once after the last.

The app's lifespan call runs in its own task for the whole life of the
server, as the spec requires (it may hold resources in its own context). The
three modes follow uvicorn's, so apps behave the same under both servers:
``"auto"`` treats an app that raises before answering the startup event as one
without lifespan support and serves it anyway, ``"on"`` makes that a startup
failure, ``"off"`` never calls the app with a lifespan scope. A
``lifespan.startup.failed`` message fails startup in every mode.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .._exceptions import LifespanFailed
from ._types import ASGIApp, LifespanMode, Message

__all__ = ["Lifespan"]

logger = logging.getLogger("overlay_httpx")


class Lifespan:
    """Drives one app's lifespan scope: `startup()`, then later `shutdown()`."""

    def __init__(self, app: ASGIApp, mode: LifespanMode) -> None:
        self._app = app
        self._mode = mode
        #: the scope's "state": what the app stored at startup, copied into every request
        self.state: dict[str, Any] = {}
        #: True once startup completed with the app's lifespan support
        self.running = False
        self._phase = "startup"  # the next event `receive` hands the app
        self._answered: anyio.Event  # the app answered the current phase (or ended)
        self._shutdown_requested: anyio.Event
        self._failure: str | None = None
        self._error: BaseException | None = None
        self._ended = False

    async def startup(self, task_group: TaskGroup) -> None:
        """Send ``lifespan.startup`` and wait for the answer; raise `LifespanFailed` on failure."""
        if self._mode == "off":
            return
        self._answered = anyio.Event()
        self._shutdown_requested = anyio.Event()
        task_group.start_soon(self._main)
        await self._answered.wait()
        if self._failure is not None:
            raise LifespanFailed(f"ASGI lifespan startup failed: {self._failure}")
        if self.running:
            return
        # The app ended (or raised) without answering the startup event.
        if self._mode == "on":
            reason = (
                f"the app raised {self._error!r}"
                if self._error is not None
                else "the app returned without answering lifespan.startup"
            )
            raise LifespanFailed(f"ASGI lifespan startup failed (lifespan='on'): {reason}")
        logger.info(
            "the ASGI app does not support the lifespan protocol (%r); serving without it",
            self._error,
        )

    async def shutdown(self) -> None:
        """Send ``lifespan.shutdown`` and wait for the answer (failures are logged)."""
        if not self.running or self._ended:
            return
        self._answered = anyio.Event()
        self._phase = "shutdown"
        self._shutdown_requested.set()
        await self._answered.wait()
        if self._failure is not None:
            logger.error("ASGI lifespan shutdown failed: %s", self._failure)

    async def _main(self) -> None:
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        try:
            await self._app(scope, self._receive, self._send)
        except Exception as exc:
            self._error = exc
            if self.running and self._phase == "startup":
                logger.error("exception in the ASGI lifespan task", exc_info=exc)
            elif self._phase == "shutdown" and self._failure is None:
                self._failure = repr(exc)
        finally:
            self._ended = True
            self._answered.set()

    async def _receive(self) -> Message:
        if self._phase == "startup" and not self.running and self._failure is None:
            return {"type": "lifespan.startup"}
        await self._shutdown_requested.wait()
        return {"type": "lifespan.shutdown"}

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        expected = f"lifespan.{self._phase}."
        if self._answered.is_set() or kind not in (expected + "complete", expected + "failed"):
            raise RuntimeError(f"unexpected ASGI lifespan message {kind!r} during {self._phase}")
        if kind.endswith(".failed"):
            self._failure = str(message.get("message", "")) or "(no message)"
        elif self._phase == "startup":
            self.running = True
        self._answered.set()
        await anyio.lowlevel.checkpoint()
