"""Per-model one-minute health window: rates, feature-store inference, expiry."""

from __future__ import annotations

from gateway.health import HealthTracker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rates_and_feature_store_status_over_the_last_minute() -> None:
    clock = Clock()
    health = HealthTracker(clock)
    assert health.stats("m").feature_store_status == "unknown"
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
    assert stats.feature_store_status == "impaired"
    assert stats.last_inference_latency_ms == 4.5
    assert health.stats("other").requests == 0

    clock.now += 30
    health.record(
        "m",
        degraded=True,
        degraded_reason="feature_store_unavailable:class_prior",
        inference_latency_ms=1.0,
    )
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
    assert stats.feature_store_status == "unavailable"
    clock.now += 120
    assert health.stats("m").requests == 0
    assert health.stats("m").last_inference_latency_ms == 1.0
