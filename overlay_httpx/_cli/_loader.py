"""Finding an ASGI app from ``MODULE:APP`` text, as uvicorn does.

``main:app`` imports ``main`` and takes its ``app``; ``pkg.api:make_app()``
(or ``--factory``) calls a factory instead. Each way this can go wrong has
its own message: a malformed spec, a module that is not there or an
attribute that is not there are usage errors; a module that raises while
importing is the app's failure.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import cast

from .._asgi._types import ASGIApp
from ._errors import CliError, UsageError

__all__ = ["load_app"]

_FORM = "expected MODULE:APP, e.g. 'main:app' or 'pkg.api:create_app()'"


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def load_app(spec: str, *, app_dir: str | None = None, factory: bool = False) -> ASGIApp:
    """Import and return the app `spec` names (`app_dir` goes first on ``sys.path``)."""
    module_name, sep, attribute = spec.strip().partition(":")
    call = factory
    if attribute.endswith("()"):
        attribute, call = attribute[:-2], True
    if not sep or not _dotted(module_name) or not _dotted(attribute):
        raise UsageError(f"invalid app {spec!r}: {_FORM}")
    if app_dir is not None:
        if not os.path.isdir(app_dir):
            raise UsageError(f"--app-dir {app_dir!r}: no such directory")
        sys.path.insert(0, os.path.abspath(app_dir))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            where = f" in {app_dir!r} or" if app_dir is not None else ""
            raise UsageError(
                f"cannot import {module_name!r} for app {spec!r}: no such module{where} on "
                f"the Python path ({_FORM}; --app-dir DIR says where to look)"
            ) from None
        raise CliError(f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise CliError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    target: object = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(
                f"module {module_name!r} has no attribute {attribute!r} (app {spec!r}: {_FORM})"
            ) from None
    if call:
        if not callable(target):
            raise UsageError(f"app factory {spec!r} is not callable")
        try:
            target = target()
        except Exception as exc:
            raise CliError(f"app factory {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if not callable(target):
        raise UsageError(
            f"{spec!r} is a {type(target).__name__}, not an ASGI app "
            "(expected an async callable app(scope, receive, send))"
        )
    return cast(ASGIApp, target)
