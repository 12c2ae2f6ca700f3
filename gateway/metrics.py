"""Prometheus metrics of one gateway app, in a registry of its own (tests build several apps)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

#: seconds; sub-millisecond resolution for the gateway's own stages
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


class GatewayMetrics:
    """Every metric the gateway exports, registered in ``registry``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._request_metrics(self.registry)
        self._triton_metrics(self.registry)
        self._catalog_metrics(self.registry)

    def _request_metrics(self, reg: CollectorRegistry) -> None:
        self.requests = Counter(
            "rtinfer_gateway_requests",
            "Prediction requests by model, arm and HTTP status.",
            ["model", "arm", "status"],
            registry=reg,
        )
        self.stage_seconds = Histogram(
            "rtinfer_gateway_stage_seconds",
            "Time spent in each named stage of a prediction (auth, route, infer, fallback, log).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.errors = Counter(
            "rtinfer_gateway_errors",
            "Error responses by error code.",
            ["code"],
            registry=reg,
        )
        self.degraded = Counter(
            "rtinfer_gateway_degraded_predictions",
            "Degraded predictions by model and reason.",
            ["model", "reason"],
            registry=reg,
        )
        self.prediction_log_errors = Counter(
            "rtinfer_gateway_prediction_log_errors",
            "Prediction-log calls that raised (the record is lost).",
            registry=reg,
        )

    def _triton_metrics(self, reg: CollectorRegistry) -> None:
        self.triton_seconds = Histogram(
            "rtinfer_gateway_triton_seconds",
            "Triton inference round trips by serving endpoint and outcome.",
            ["endpoint", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.triton_batch_rows = Histogram(
            "rtinfer_gateway_triton_batch_rows",
            "Rows per Triton request after coalescing concurrent predictions, by endpoint.",
            ["endpoint"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=reg,
        )
        self.endpoint_open = Gauge(
            "rtinfer_gateway_endpoint_open",
            "1 while the endpoint's guard serves the fallback without calling Triton "
            "(a non-timeout error, not yet cleared by a probe).",
            ["endpoint"],
            registry=reg,
        )
        self.endpoint_probes = Counter(
            "rtinfer_gateway_endpoint_probes",
            "Background probes of failing or suspect endpoints by outcome (ok, error, timeout).",
            ["endpoint", "outcome"],
            registry=reg,
        )

    def _catalog_metrics(self, reg: CollectorRegistry) -> None:
        self.catalog_reloads = Counter(
            "rtinfer_gateway_catalog_reloads",
            "Model catalog reloads by result (ok, error).",
            ["result"],
            registry=reg,
        )
        self.catalog_listening = Gauge(
            "rtinfer_gateway_catalog_listening",
            "1 while the LISTEN model_catalog connection is up.",
            registry=reg,
        )
        self.shadow_requests = Counter(
            "rtinfer_gateway_shadow_requests",
            "Requests mirrored to shadow deployments by model and outcome (ok, error, dropped).",
            ["model", "outcome"],
            registry=reg,
        )
        self.shadow_seconds = Histogram(
            "rtinfer_gateway_shadow_seconds",
            "Shadow calls (Triton round trip) by model and outcome (ok, error).",
            ["model", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
