"""What the fault soak's processes share: request ids, execution logs, retry counting.

Why: the soak (`soak_pipeline.py`) has to tell how often each request was *executed*
by each service (a non-idempotent request executed twice is a duplicate) and how often
the overlay transport *re-sent* it on its own (a retry). Neither is visible from
outside, so every soak process uses these pieces:

* `ExecutionLog`, an ASGI wrapper that appends one line per request a service begins
  (time, request id, method, path) to a file with unbuffered ``O_APPEND`` writes, so
  the log survives a SIGKILL of the service; it also puts the request id in a context
  variable for the duration of the request;
* `CountingTransport`, an `OverlayTransport` that counts the attempts of each request
  in ``request.extensions["soak_attempts"]`` (hooking the transport's per-attempt
  method, which is private: the library has no public hook for this yet) and, inside a
  request that `ExecutionLog` tagged, gives the outgoing request the derived id
  ``<incoming id>.<first label of the host>`` (``c000042.llm``), so the orchestrator's
  stage calls carry ids without changing the example's code;
* `die_with_parent`, so no child outlives a killed soak.

Not run by hand: imported by ``_soak_node.py`` and ``_soak_load.py``.
"""

from __future__ import annotations

import contextvars
import ctypes
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Final

import httpx

from overlay_httpx import OverlayTransport

ID_HEADER: Final = "x-soak-id"
"""Request header carrying the client-supplied request id."""
ATTEMPTS: Final = "soak_attempts"
"""Key in ``request.extensions`` where `CountingTransport` counts attempts."""

CURRENT_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "soak_current_id", default=None
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_PR_SET_PDEATHSIG: Final = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `signum` to this process when its parent dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the stdin lifeline still works
        pass


def configure_logging(name: str) -> None:
    """Warnings and errors to stderr; ``$SOAK_LOG_LEVEL`` (e.g. DEBUG) for overlay_httpx's."""
    logging.basicConfig(
        level=logging.WARNING, format=f"{name} %(created).3f %(levelname)s %(message)s"
    )
    level = os.environ.get("SOAK_LOG_LEVEL", "").upper()
    if level:
        logging.getLogger("overlay_httpx").setLevel(getattr(logging, level, logging.WARNING))


def emit(**fields: object) -> None:
    """One JSON line on stdout (ready lines, events), flushed at once."""
    sys.stdout.write(json.dumps({"pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


class AppendLog:
    """A line-oriented log written with unbuffered O_APPEND writes (survives SIGKILL)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write(self, *fields: object) -> None:
        os.write(self._fd, ("\t".join(str(f) for f in fields) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class ExecutionLog:
    """ASGI wrapper: log every HTTP request the app begins, by its ``x-soak-id``."""

    def __init__(self, app: ASGIApp, log: AppendLog) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _header(scope, ID_HEADER.encode()) or "-"
        self.log.write(f"{time.time():.6f}", request_id, scope["method"], scope["path"])
        token = CURRENT_ID.set(None if request_id == "-" else request_id)
        try:
            await self.app(scope, receive, send)
        finally:
            CURRENT_ID.reset(token)


class CountingTransport(OverlayTransport):
    """`OverlayTransport` that counts attempts per request and propagates request ids.

    ``retry_log``, if set on the class, gets a line per automatic re-send:
    time, request id, attempt number, method, URL.
    """

    retry_log: AppendLog | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        parent = CURRENT_ID.get()
        if parent is not None and ID_HEADER not in request.headers:
            request.headers[ID_HEADER] = f"{parent}.{request.url.host.split('.')[0]}"
        request.extensions.setdefault(ATTEMPTS, 0)
        return await super().handle_async_request(request)

    async def _exchange(self, request: httpx.Request, conn: Any) -> httpx.Response:
        attempt = int(request.extensions.get(ATTEMPTS, 0)) + 1
        request.extensions[ATTEMPTS] = attempt
        log = type(self).retry_log
        if attempt > 1 and log is not None:
            request_id = request.headers.get(ID_HEADER, "-")
            log.write(f"{time.time():.6f}", request_id, attempt, request.method, request.url)
        response: httpx.Response = await super()._exchange(request, conn)
        return response


def attempts(request: httpx.Request | None) -> int:
    """How many times `CountingTransport` sent `request` (0 if it never got that far)."""
    if request is None:
        return 0
    return int(request.extensions.get(ATTEMPTS, 0))


def repo_root() -> Path:
    """The repository root (parent of ``benchmarks/``), for ``import examples.pipeline``."""
    return Path(__file__).resolve().parents[1]
