"""Per-model one-minute health window: rates, expiry, and the sum over gateway workers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gateway.serving.health import STALE_S, HealthTracker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rates_over_the_last_minute() -> None:
    clock = Clock()
    health = HealthTracker(clock)
    assert health.stats("m").requests == 0
    for _ in range(3):
        health.record("m", degraded=False, degraded_reason=None, inference_latency_ms=2.0)
    health.record(
        "m",
        degraded=True,
        degraded_reason="feature_store_unavailable:fraud_context_lr",
        inference_latency_ms=4.5,
    )
    # the gateway's own fallback: degraded, but says nothing about the feature store
    health.record(
        "m",
        degraded=True,
        degraded_reason="triton_unavailable:class_prior",
        inference_latency_ms=None,
    )
    stats = health.stats("m")
    assert (stats.requests, stats.degraded, stats.triton_answers) == (5, 2, 4)
    assert stats.degraded_rate == 0.4
    assert stats.feature_store_degraded_rate == 0.25
    assert stats.last_inference_latency_ms == 4.5
    assert stats.workers == 1
    assert health.stats("other").requests == 0

    clock.now += 30
    for _ in range(2):
        health.record(
            "m",
            degraded=True,
            degraded_reason="feature_store_unavailable:class_prior",
            inference_latency_ms=1.0,
        )
    assert health.stats("m").requests == 7

    clock.now += 31  # the first second's records are older than a minute
    stats = health.stats("m")
    assert (stats.requests, stats.degraded) == (2, 2)
    assert stats.feature_store_degraded_rate == 1.0
    clock.now += 120
    assert health.stats("m").requests == 0
    assert health.stats("m").last_inference_latency_ms == 1.0


def _peer(share: Path, pid: int, at: float, requests: int, latency_at: float) -> None:
    window = {
        "buckets": [[int(at), requests, requests, requests, 0]],
        "last_latency_ms": 9.0,
        "last_latency_at": latency_at,
    }
    (share / f"{pid}.json").write_text(json.dumps({"pid": pid, "at": at, "models": {"m": window}}))


def test_every_worker_answers_for_the_counts_of_all_live_workers(tmp_path: Path) -> None:
    clock = Clock()
    a, b = HealthTracker(clock, share_dir=tmp_path), HealthTracker(clock, share_dir=tmp_path)
    b._pid = os.getpid() + 1  # another worker process sharing the directory
    for _ in range(3):
        a.record("m", degraded=False, degraded_reason=None, inference_latency_ms=2.0)
    clock.now += 0.5
    b.record("m", degraded=True, degraded_reason=None, inference_latency_ms=7.0)
    a.publish()
    b.publish()
    for tracker in (a, b):
        stats = tracker.stats("m")
        assert (stats.requests, stats.degraded, stats.workers) == (4, 1, 2)
        assert stats.last_inference_latency_ms == 7.0  # the most recent of any worker

    clock.now += STALE_S + 1  # b stopped publishing (gone or stuck): no longer counted
    a.publish()
    assert (a.stats("m").requests, a.stats("m").workers) == (3, 1)
    a.forget()
    assert not (tmp_path / f"{os.getpid()}.json").exists()


def test_stale_and_foreign_files_are_skipped_and_expired_ones_removed(tmp_path: Path) -> None:
    clock = Clock()
    tracker = HealthTracker(clock, share_dir=tmp_path)
    _peer(tmp_path, 11, clock.now - 1, 5, clock.now - 1)
    _peer(tmp_path, 12, clock.now - 120, 50, clock.now - 120)  # long gone
    (tmp_path / "13.json").write_text("{torn")
    stats = tracker.stats("m")
    assert (stats.requests, stats.workers) == (5, 2)
    assert not (tmp_path / "12.json").exists()
