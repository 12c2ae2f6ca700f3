"""Prometheus metrics of the model lifecycle (swaps, failures, step durations)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class LifecycleMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.changes = Counter(
            "rtinfer_lifecycle_changes",
            "Catalog changes made by the lifecycle, by model and action "
            "(promoted, canary, shadow, rolled_back, retired).",
            ["model", "action"],
            registry=reg,
        )
        self.failures = Counter(
            "rtinfer_lifecycle_failures",
            "Swaps that failed and left the served version untouched, by model and step.",
            ["model", "step"],
            registry=reg,
        )
        self.step_seconds = Histogram(
            "rtinfer_lifecycle_step_seconds",
            "Duration of each swap step (materialize, load, smoke, catalog, retire).",
            ["step"],
            buckets=STEP_BUCKETS,
            registry=reg,
        )
