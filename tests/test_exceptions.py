"""The one exception tree: every public exception is an `OverlayError`, drawn in the diagram."""

from __future__ import annotations

import builtins
import re

import anyio
import pytest

import overlay_httpx
from overlay_httpx import _exceptions

# "    │   ├── IdentityNotFound    (FileNotFoundError)   text": a name, then maybe a base
DIAGRAM_LINE = re.compile(r"^[\s│]*[├└]── (\w+)\s*(?:\(([\w.]+)\))?")


def diagram() -> dict[str, str | None]:
    """Each class the module docstring draws, with the builtin base it names (if any)."""
    assert _exceptions.__doc__ is not None
    drawn: dict[str, str | None] = {}
    for line in _exceptions.__doc__.splitlines():
        match = DIAGRAM_LINE.match(line)
        if match:
            drawn[match.group(1)] = match.group(2)
    return drawn


PUBLIC = sorted(
    name
    for name in overlay_httpx.__all__
    if isinstance(getattr(overlay_httpx, name), type)
    and issubclass(getattr(overlay_httpx, name), BaseException)
)


def test_the_diagram_is_read() -> None:
    drawn = diagram()
    assert drawn["IdentityNotFound"] == "FileNotFoundError"
    assert drawn["TunnelError"] is None
    assert len(drawn) >= 20


@pytest.mark.parametrize("name", PUBLIC)
def test_public_exceptions_are_overlay_errors_in_the_diagram(name: str) -> None:
    cls = getattr(overlay_httpx, name)
    assert cls is overlay_httpx.OverlayError or issubclass(cls, overlay_httpx.OverlayError)
    assert name == "OverlayError" or name in diagram(), f"{name} is not in the tree diagram"


@pytest.mark.parametrize("name", sorted(diagram()))
def test_diagram_names_real_classes_with_their_builtin_bases(name: str) -> None:
    cls = getattr(_exceptions, name)
    assert name in _exceptions.__all__
    base = diagram()[name]
    if base is not None:
        module, _, attr = base.rpartition(".")
        expected = getattr(anyio, attr) if module == "anyio" else vars(builtins)[attr]
        assert issubclass(cls, expected), f"{name} should derive from {base}"


def test_server_side_errors_keep_their_builtin_meaning() -> None:
    # ASGI 2.4 asks for OSError from send(); code catching RuntimeError at startup still works
    assert issubclass(overlay_httpx.ClientDisconnected, OSError)
    assert issubclass(overlay_httpx.LifespanFailed, RuntimeError)
