"""Per-model serving health over the last minute: request and degraded counts, last latency.

Counts live in 60 one-second buckets per model, so recording is O(1) at any request rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 60
FEATURE_STORE_REASON = "feature_store_unavailable"


@dataclass(frozen=True)
class WindowStats:
    requests: int
    degraded: int
    #: answers from Triton (not the gateway's fallback), and those degraded for lack of features
    triton_answers: int
    feature_store_degraded: int
    last_inference_latency_ms: float | None

    @property
    def degraded_rate(self) -> float | None:
        return self.degraded / self.requests if self.requests else None

    @property
    def feature_store_degraded_rate(self) -> float | None:
        return self.feature_store_degraded / self.triton_answers if self.triton_answers else None

    @property
    def feature_store_status(self) -> str:
        rate = self.feature_store_degraded_rate
        if rate is None:
            return "unknown"
        if rate == 0:
            return "ok"
        return "unavailable" if rate >= 0.5 else "impaired"


class _Window:
    def __init__(self) -> None:
        # per bucket: [second, requests, degraded, triton_answers, feature_store_degraded]
        self.buckets = [[-1, 0, 0, 0, 0] for _ in range(WINDOW_S)]
        self.last_latency_ms: float | None = None


class HealthTracker:
    """Rolling one-minute counters per model, fed by the prediction service."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._models: dict[str, _Window] = {}

    def record(
        self,
        model_name: str,
        *,
        degraded: bool,
        degraded_reason: str | None,
        inference_latency_ms: float | None,
    ) -> None:
        """One served prediction; ``inference_latency_ms`` is None when Triton did not answer."""
        window = self._models.get(model_name)
        if window is None:
            window = self._models[model_name] = _Window()
        second = int(self._clock())
        bucket = window.buckets[second % WINDOW_S]
        if bucket[0] != second:
            bucket[:] = [second, 0, 0, 0, 0]
        bucket[1] += 1
        bucket[2] += degraded
        if inference_latency_ms is not None:
            window.last_latency_ms = inference_latency_ms
            bucket[3] += 1
            bucket[4] += bool(degraded_reason and degraded_reason.startswith(FEATURE_STORE_REASON))

    def stats(self, model_name: str) -> WindowStats:
        window = self._models.get(model_name)
        if window is None:
            return WindowStats(0, 0, 0, 0, None)
        oldest = int(self._clock()) - WINDOW_S
        totals = [0, 0, 0, 0]
        for second, *counts in window.buckets:
            if second > oldest:
                totals = [t + c for t, c in zip(totals, counts, strict=True)]
        return WindowStats(*totals, last_inference_latency_ms=window.last_latency_ms)
