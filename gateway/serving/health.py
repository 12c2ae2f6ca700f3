"""Per-model serving counters over the last minute: requests, degraded answers, last latency.

Counts live in 60 one-second buckets per model, so recording is O(1) at any request rate.
Each gateway worker process counts what it serves; with ``share_dir`` set, every worker also
publishes its window there once a second (``<pid>.json``, written atomically) and
:meth:`HealthTracker.stats` adds up its own window and those of the other live workers, so the
health endpoint answers for the whole gateway whichever worker takes the request. Buckets are
keyed by ``time.monotonic()`` seconds, one clock for every process of a host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WINDOW_S = 60
FEATURE_STORE_REASON = "feature_store_unavailable"
#: a worker's published window older than this is not counted (the worker is gone or stuck)
STALE_S = 5.0
#: published windows older than this are deleted
EXPIRED_S = 60.0


@dataclass(frozen=True)
class WindowStats:
    requests: int
    degraded: int
    #: answers from Triton (not the gateway's fallback), and those degraded for lack of features
    triton_answers: int
    feature_store_degraded: int
    last_inference_latency_ms: float | None
    #: gateway worker processes whose counts are included
    workers: int = 1

    @property
    def degraded_rate(self) -> float | None:
        return self.degraded / self.requests if self.requests else None

    @property
    def feature_store_degraded_rate(self) -> float | None:
        return self.feature_store_degraded / self.triton_answers if self.triton_answers else None


class _Window:
    def __init__(self) -> None:
        # per bucket: [second, requests, degraded, triton_answers, feature_store_degraded]
        self.buckets = [[-1, 0, 0, 0, 0] for _ in range(WINDOW_S)]
        self.last_latency_ms: float | None = None
        self.last_latency_at: float = 0.0


class HealthTracker:
    """Rolling one-minute counters per model, fed by the prediction service."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, share_dir: Path | None = None
    ) -> None:
        self._clock = clock
        self._models: dict[str, _Window] = {}
        self.share_dir = share_dir
        self._pid = os.getpid()

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
        now = self._clock()
        second = int(now)
        bucket = window.buckets[second % WINDOW_S]
        if bucket[0] != second:
            bucket[:] = [second, 0, 0, 0, 0]
        bucket[1] += 1
        bucket[2] += degraded
        if inference_latency_ms is not None:
            window.last_latency_ms, window.last_latency_at = inference_latency_ms, now
            bucket[3] += 1
            bucket[4] += bool(degraded_reason and degraded_reason.startswith(FEATURE_STORE_REASON))

    def stats(self, model_name: str) -> WindowStats:
        """This worker's window of ``model_name`` plus the live windows other workers shared."""
        oldest = int(self._clock()) - WINDOW_S
        totals = [0, 0, 0, 0]
        last: tuple[float, float | None] = (0.0, None)
        workers = 1
        own = self._models.get(model_name)
        windows = [_snapshot(own)] if own is not None else []
        for peer in self._peers():
            workers += 1
            if model_name in peer:
                windows.append(peer[model_name])
        for window in windows:
            for second, *counts in window["buckets"]:
                if second > oldest:
                    totals = [t + c for t, c in zip(totals, counts, strict=True)]
            if window["last_latency_ms"] is not None and window["last_latency_at"] >= last[0]:
                last = (window["last_latency_at"], window["last_latency_ms"])
        return WindowStats(*totals, last_inference_latency_ms=last[1], workers=workers)

    def publish(self) -> None:
        """Write this worker's windows for the others (no-op without ``share_dir``)."""
        if self.share_dir is None:
            return
        self.share_dir.mkdir(parents=True, exist_ok=True)
        body = {
            "pid": self._pid,
            "at": self._clock(),
            "models": {name: _snapshot(w) for name, w in self._models.items()},
        }
        path = self.share_dir / f"{self._pid}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(path)

    def forget(self) -> None:
        """Remove this worker's published window (on shutdown)."""
        if self.share_dir is not None:
            (self.share_dir / f"{self._pid}.json").unlink(missing_ok=True)

    def _peers(self) -> Iterator[dict[str, Any]]:
        if self.share_dir is None or not self.share_dir.is_dir():
            return
        now = self._clock()
        for path in self.share_dir.glob("*.json"):
            if path.stem == str(self._pid):
                continue
            try:
                body = json.loads(path.read_text())
                age = now - float(body["at"])
                models = body["models"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being replaced, or not ours
            if age > EXPIRED_S:
                with contextlib.suppress(OSError):
                    path.unlink()
            elif age <= STALE_S:
                yield models


def _snapshot(window: _Window) -> dict[str, Any]:
    return {
        "buckets": [b for b in window.buckets if b[0] >= 0],
        "last_latency_ms": window.last_latency_ms,
        "last_latency_at": window.last_latency_at,
    }
