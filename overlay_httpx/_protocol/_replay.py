"""Anti-replay: accept each packet counter at most once per session key."""

from __future__ import annotations

from typing import Final

__all__ = ["WINDOW_SIZE", "ReplayWindow"]

WINDOW_SIZE: Final = 8192


class ReplayWindow:
    """A sliding bitmap over the last `WINDOW_SIZE` counters (RFC 6479 style).

    Counters far older than the highest seen are refused outright: they may
    have been accepted before and we no longer remember.
    """

    __slots__ = ("_bits", "_highest", "_mask", "_size")

    def __init__(self, size: int = WINDOW_SIZE) -> None:
        self._size = size
        self._mask = (1 << size) - 1  # made once: it is a `size`-bit integer
        self._highest = -1
        self._bits = 0  # bit i set <=> counter (highest - i) was seen

    @property
    def highest(self) -> int:
        return self._highest

    def check(self, counter: int) -> bool:
        """True when `counter` is new (not yet seen, not too old); does not record it."""
        if counter > self._highest:
            return True
        age = self._highest - counter
        if age >= self._size:
            return False
        return not (self._bits >> age) & 1

    def mark(self, counter: int) -> None:
        """Record `counter` as seen; call only after the packet authenticated."""
        if counter > self._highest:
            shift = counter - self._highest
            self._bits = ((self._bits << shift) | 1) & self._mask
            self._highest = counter
        else:
            self._bits |= 1 << (self._highest - counter)
