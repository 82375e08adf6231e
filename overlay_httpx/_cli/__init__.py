"""The ``overlay-httpx`` console script (also ``python -m overlay_httpx``).

Commands: ``keygen``, ``serve``, ``request``, ``gateway``, ``expose``; see
``overlay-httpx --help``. The pieces they are built from (the byte pipe, the
reverse-proxy app) live in private modules so tests can drive them directly.
"""

from ._main import main

__all__ = ["main"]
