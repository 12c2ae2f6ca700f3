"""A circuit breaker: stop calling a dependency that keeps failing, try again later.

Used by the feature assembler in front of the online feature store (inside Triton) and by the
gateway's rate limiter in front of Redis; it imports nothing of either.

Closed: calls go through and consecutive failures are counted. After ``failure_threshold``
consecutive failures the breaker opens: :meth:`CircuitBreaker.allow` answers ``False`` without
touching the network until ``reset_timeout_s`` has passed. Then it is half-open and lets a single
trial call through; its success closes the breaker, its failure opens it again.

Not thread-safe: each Triton python-backend instance runs ``execute`` in one thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure circuit breaker with a single half-open trial."""

    def __init__(
        self,
        failure_threshold: int = 3,
        reset_timeout_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_timeout_s <= 0:
            raise ValueError("reset_timeout_s must be positive")
        self._threshold = failure_threshold
        self._reset_timeout = reset_timeout_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_started_at = 0.0
        #: how many times the breaker went from closed or half-open to open
        self.opened_total = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to the protected dependency now."""
        if self._state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if self._state is BreakerState.OPEN:
            if now - self._opened_at < self._reset_timeout:
                return False
            self._state = BreakerState.HALF_OPEN
            self._trial_started_at = now
            return True
        # Half-open: one trial is in flight. Should its outcome never be reported, allow
        # another trial after a further reset timeout instead of staying stuck.
        if now - self._trial_started_at >= self._reset_timeout:
            self._trial_started_at = now
            return True
        return False

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0

    def record_failure(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._open()
            return
        self._failures += 1
        if self._state is BreakerState.CLOSED and self._failures >= self._threshold:
            self._open()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._failures = 0
        self.opened_total += 1
