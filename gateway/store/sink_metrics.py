"""Prometheus metrics of a prediction sink (``rtinfer_sink_*``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rows = Counter(
            "rtinfer_sink_rows", "Rows stored, by table (rate: rows/s).", ["table"], registry=r
        )
        self.insert_seconds = Histogram(
            "rtinfer_sink_insert_seconds",
            "Time of one batched insert, by table.",
            ["table"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.insert_failures = Counter(
            "rtinfer_sink_insert_failures",
            "Failed inserts: transient (store unreachable, retried) or refused (rows then "
            "inserted one by one; refused rows are dead-lettered).",
            ["kind"],
            registry=r,
        )
        self.dead_letters = Counter(
            "rtinfer_sink_dead_letters",
            "Messages sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.batch_rows = Histogram(
            "rtinfer_sink_batch_rows",
            "Messages per batch.",
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000),
            registry=r,
        )
        self.lag = Gauge(
            "rtinfer_sink_consumer_lag",
            "Messages not yet stored (high watermark minus the group's commit), by topic.",
            ["topic"],
            registry=r,
        )
        self.committed_at = Gauge(
            "rtinfer_sink_last_commit_timestamp_seconds",
            "When this sink last committed offsets (Unix time).",
            registry=r,
        )
