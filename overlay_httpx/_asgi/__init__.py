"""The ASGI bridge: serve any ASGI 3 app (FastAPI unmodified) over HTTP/2 on an overlay port."""

from .._exceptions import ClientDisconnected, LifespanFailed
from ._server import OverlayServer, serve

__all__ = ["ClientDisconnected", "LifespanFailed", "OverlayServer", "serve"]
