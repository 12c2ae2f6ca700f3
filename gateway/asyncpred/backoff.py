"""Retry delays: capped exponential backoff with full jitter (pure, seedable).

Attempt ``n`` (1 for the wait after the first failure) waits a uniformly random time in
``[0, min(cap, base * 2 ** (n - 1))]``: spreading retries over the whole window keeps many
failing jobs from retrying in lock-step against a receiver that is coming back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """``delay(n)``: seconds to wait after the ``n``-th failed attempt."""

    base_s: float
    cap_s: float
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.cap_s < self.base_s:
            raise ValueError("backoff needs 0 < base_s <= cap_s")

    def ceiling(self, attempt: int) -> float:
        """The largest delay after failed attempt ``attempt`` (>= 1), before jitter."""
        if attempt < 1:
            raise ValueError("attempt numbers start at 1")
        # 2 ** 64 is far past any cap; bounding the exponent avoids float overflow
        return min(self.cap_s, self.base_s * 2.0 ** min(attempt - 1, 64))

    def delay(self, attempt: int) -> float:
        """A random delay in ``[0, ceiling(attempt)]``."""
        return self.rng.uniform(0.0, self.ceiling(attempt))
