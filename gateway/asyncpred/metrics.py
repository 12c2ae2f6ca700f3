"""Prometheus metrics of async predictions: the gateway's side and the worker's side.

The gateway registers :class:`AsyncDoorMetrics` in its app registry (served at ``/metrics``);
a worker registers :class:`AsyncWorkerMetrics` next to the prediction service's
``GatewayMetrics`` in its own registry, served on ``async_predict.metrics_port``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: seconds from submission to stored result
JOB_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class AsyncDoorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.enqueued = Counter(
            "rtinfer_async_jobs_enqueued",
            "Async jobs Kafka confirmed (answered 202), by model.",
            ["model"],
            registry=registry,
        )
        self.enqueue_failures = Counter(
            "rtinfer_async_enqueue_failures",
            "Async jobs Kafka did not confirm (answered 503), by reason "
            "(queue_full, rejected, failed, timeout).",
            ["reason"],
            registry=registry,
        )


class AsyncWorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.completed = Counter(
            "rtinfer_async_jobs_completed",
            "Async jobs whose result was stored, by status (done, failed).",
            ["status"],
            registry=registry,
        )
        self.duplicates = Counter(
            "rtinfer_async_jobs_redelivered",
            "Redelivered async jobs that found their result already stored (not predicted).",
            registry=registry,
        )
        self.prediction_retries = Counter(
            "rtinfer_async_prediction_retries",
            "Prediction attempts of async jobs that failed transiently and were retried.",
            registry=registry,
        )
        self.callbacks = Counter(
            "rtinfer_async_callback_attempts",
            "Callback POST attempts by outcome (delivered, http_error, network_error, "
            "unresolved, rejected).",
            ["outcome"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "rtinfer_async_dlq",
            "Async jobs written to the dead-letter topic, by reason.",
            ["reason"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "rtinfer_async_jobs_in_flight",
            "Async jobs this worker is running.",
            registry=registry,
        )
        self.job_seconds = Histogram(
            "rtinfer_async_job_seconds",
            "Time from submission to stored result.",
            buckets=JOB_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_lag = Gauge(
            "rtinfer_async_queue_lag",
            "Messages of a partition assigned to this worker not yet committed "
            "(high watermark - committed offset).",
            ["topic", "partition"],
            registry=registry,
        )
        self.commits = Counter(
            "rtinfer_async_offset_commits",
            "Offset commits by result (ok, error).",
            ["result"],
            registry=registry,
        )
