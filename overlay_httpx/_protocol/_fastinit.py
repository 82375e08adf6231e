"""A cheaper ``__init__`` for the small frozen dataclasses made for every packet."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["fast_frozen_init"]

_T = TypeVar("_T")


def fast_frozen_init(cls: type[_T]) -> type[_T]:
    """Give the frozen, slotted dataclass `cls` an ``__init__`` that stores into its slots.

    Frozen dataclasses forbid assignment, so the ``__init__`` that
    ``dataclass`` writes sets each field through ``object.__setattr__``,
    which looks the slot up by name every time. Each packet makes a handful
    of these objects (its ACK and STREAM frames, what recovery remembers of
    them, the ACK's result and rate sample), and storing through each slot's
    descriptor, fetched once here, halves what building them costs.

    Nothing else changes: the same parameters (positional or by keyword),
    and the class stays frozen, hashable and comparable. Only plain fields
    are supported (no defaults, ``kw_only``, ``InitVar`` or ``__post_init__``):
    anything else raises TypeError here, at import, rather than behaving
    differently. Like ``dataclass`` itself, it compiles the ``__init__`` from
    source, so argument errors read exactly as before.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__qualname__} must be a frozen dataclass with slots")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    everything: dict[str, Any] = cls.__dataclass_fields__  # type: ignore[attr-defined]
    if (
        len(fields) != len(everything)
        or hasattr(cls, "__post_init__")
        or any(
            f.default is not dataclasses.MISSING
            or f.default_factory is not dataclasses.MISSING
            or not f.init
            or f.kw_only
            for f in fields
        )
    ):
        raise TypeError(f"{cls.__qualname__} has a field fast_frozen_init cannot handle")
    names = [f.name for f in fields]
    namespace: dict[str, Any] = {f"_set_{n}": cls.__dict__[n].__set__ for n in names}
    body = "".join(f"    _set_{n}(self, {n})\n" for n in names) or "    pass\n"
    exec(f"def __init__(self, {', '.join(names)}):\n{body}", namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__annotations__ = dict(cls.__init__.__annotations__)
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
