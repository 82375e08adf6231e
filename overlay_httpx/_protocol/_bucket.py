"""`TokenBucket`: a rate limit with bursts, on whatever clock its caller passes in."""

from __future__ import annotations

import math

__all__ = ["TokenBucket"]


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; starts full."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = -math.inf  # the caller's clock; the first take starts it

    def available(self, now: float) -> float:
        """The balance now (negative while paying off a debt)."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return self.tokens

    def charge(self, cost: float, now: float) -> None:
        """Pay for something that passes regardless (the balance may go below zero)."""
        self.tokens = self.available(now) - cost

    def take(self, cost: float, now: float, *, debt: bool = False) -> bool:
        """Whether something costing `cost` may pass now (and pay for it if so).

        With `debt`, any positive balance lets it through and may go below zero:
        something larger than the burst is slowed down, never refused forever.
        """
        tokens = self.available(now)
        if (tokens <= 0) if debt else tokens < cost:
            return False
        self.tokens -= cost
        return True
