"""Triton python-backend shell of the feature assembler.

Inputs ``user_id``/``merchant_id`` (BYTES [rows, 1]) and ``context`` (FP32 [rows, n_context]);
outputs ``features`` (FP32 [rows, n_features]), ``imputed_count`` (INT32 [rows, 1]) and
``feature_store_ok`` (BOOL [rows, 1]). The logic lives in
:mod:`python_backend.features.assembler`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend.breaker import BreakerState, CircuitBreaker
from python_backend.contract import CONTEXT, INPUTS, MERCHANT_ID, USER_ID
from python_backend.feature_spec import FEATURE_SPEC_FILE, FeatureSpec
from python_backend.features.assembler import (
    AssemblerStats,
    AssemblyError,
    AssemblyInput,
    AssemblyOutput,
    FeatureAssembler,
    online_fields,
)
from python_backend.features.cache import EntityCache
from python_backend.features.keys import DEFAULT_KEY_PREFIX
from python_backend.features.store import RedisFeatureStore, redis_client_from_url
from python_backend.metrics import CounterBuffer, Reservoir
from python_backend.triton_config import (
    get_param,
    model_config,
    param_float,
    param_int,
    version_dir,
)

logger = logging.getLogger(__name__)

FETCH_BUCKETS_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25]
BREAKER_STATE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}

#: AssemblerStats counter -> (metric name, description)
COUNTERS = {
    "requests": ("rtinfer_feature_requests_total", "Requests received by the feature assembler"),
    "invalid_requests": ("rtinfer_feature_invalid_requests_total", "Requests rejected as invalid"),
    "rows": ("rtinfer_feature_rows_total", "Rows assembled"),
    "entities_not_found": (
        "rtinfer_feature_entities_not_found_total",
        "Row lookups whose entity has no hash in the online store",
    ),
    "store_round_trips": ("rtinfer_feature_store_round_trips_total", "Redis pipelines sent"),
    "store_errors": ("rtinfer_feature_store_errors_total", "Redis pipelines that failed"),
    "breaker_short_circuits": (
        "rtinfer_feature_breaker_short_circuits_total",
        "Batches served without Redis because the circuit breaker was open",
    ),
    "cache_hits": ("rtinfer_feature_cache_hits_total", "Entity lookups served by the hot cache"),
    "cache_misses": ("rtinfer_feature_cache_misses_total", "Entity lookups missing the hot cache"),
}


class _Metrics:
    """Publishes the assembler's counters to Triton's Prometheus endpoint, buffered.

    Counters and the breaker gauge are pushed at most once per ``interval_s``; the fetch-time
    histogram gets a uniform sample of up to ``FETCH_SAMPLE`` round trips per interval (the
    exact number of round trips is the round-trips counter).
    """

    FETCH_SAMPLE = 64

    def __init__(
        self,
        labels: dict[str, str],
        groups: list[str],
        breaker: CircuitBreaker,
        interval_s: float,
    ) -> None:
        counter = pb_utils.MetricFamily.COUNTER
        # Triton requires a MetricFamily to outlive its Metric objects: keep every family.
        self._families: list[Any] = []
        self._breaker = breaker
        self._buffer = CounterBuffer(interval_s)
        self._fetch_sample = Reservoir(self.FETCH_SAMPLE)
        self._counters = {
            field: self._family(name, doc, counter).Metric(labels=labels)
            for field, (name, doc) in COUNTERS.items()
        }
        imputed = self._family(
            "rtinfer_feature_imputed_total",
            "Features replaced by their default (missing, invalid, store down)",
            counter,
        )
        self._imputed = {g: imputed.Metric(labels={**labels, "group": g}) for g in groups}
        self._fetch_seconds = self._family(
            "rtinfer_feature_store_fetch_seconds",
            "Duration of one pipelined Redis round trip (uniform sample, up to "
            f"{self.FETCH_SAMPLE} per {interval_s:g}s)",
            pb_utils.MetricFamily.HISTOGRAM,
        ).Metric(labels=labels, buckets=FETCH_BUCKETS_S)
        self._breaker_state = self._family(
            "rtinfer_feature_breaker_state",
            "Feature store circuit breaker: 0 closed, 1 half-open, 2 open",
            pb_utils.MetricFamily.GAUGE,
        ).Metric(labels=labels)
        self._breaker_opened = self._family(
            "rtinfer_feature_breaker_opened_total",
            "Times the feature store circuit breaker opened",
            counter,
        ).Metric(labels=labels)
        self._opened_seen = 0
        self._state_published: int | None = None

    def _family(self, name: str, description: str, kind: Any) -> Any:
        family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        self._families.append(family)
        return family

    def record(self, before: AssemblerStats, after: AssemblerStats) -> None:
        """Account one batch locally (no server round trip); publish when due."""
        for field in self._counters:
            self._buffer.add(field, getattr(after, field) - getattr(before, field))
        for group in self._imputed:
            self._buffer.add(("imputed", group), after.imputed[group] - before.imputed[group])
        if after.store_round_trips > before.store_round_trips:
            self._fetch_sample.add(after.last_fetch_seconds)
        if self._buffer.due():
            self.publish()

    def publish(self) -> None:
        for key, delta in self._buffer.drain().items():
            metric = self._imputed[key[1]] if isinstance(key, tuple) else self._counters[key]
            metric.increment(delta)
        for seconds in self._fetch_sample.drain():
            self._fetch_seconds.observe(seconds)
        state = BREAKER_STATE_VALUE[self._breaker.state]
        if state != self._state_published:
            self._breaker_state.set(state)
            self._state_published = state
        opened = self._breaker.opened_total
        if opened > self._opened_seen:
            self._breaker_opened.increment(opened - self._opened_seen)
            self._opened_seen = opened


def _read_request(request: Any) -> AssemblyInput | AssemblyError:
    tensors = {}
    for name in INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return AssemblyError(f"missing input {name}")
        tensors[name] = tensor.as_numpy()
    return AssemblyInput(
        user_ids=tensors[USER_ID].reshape(-1).tolist(),
        merchant_ids=tensors[MERCHANT_ID].reshape(-1).tolist(),
        context=tensors[CONTEXT],
    )


def _response(result: AssemblyOutput | AssemblyError) -> Any:
    if isinstance(result, AssemblyError):
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(result.message, pb_utils.TritonError.INVALID_ARG)
        )
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("features", np.ascontiguousarray(result.features)),
            pb_utils.Tensor("imputed_count", result.imputed_count.reshape(-1, 1)),
            pb_utils.Tensor("feature_store_ok", result.feature_store_ok.reshape(-1, 1)),
        ]
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = model_config(args)
        spec_file = get_param(config, "feature_spec", FEATURE_SPEC_FILE) or FEATURE_SPEC_FILE
        spec = FeatureSpec.load(os.path.join(version_dir(args), spec_file))
        redis_url = get_param(config, "redis_url")
        if redis_url is None:
            raise pb_utils.TritonModelException("model parameter redis_url is required")
        client = redis_client_from_url(redis_url, param_float(config, "redis_timeout_ms", 10.0))
        self._breaker = CircuitBreaker(
            failure_threshold=param_int(config, "breaker_failure_threshold", 3),
            reset_timeout_s=param_float(config, "breaker_reset_timeout_s", 1.0),
        )
        self._assembler = FeatureAssembler(
            spec,
            store=RedisFeatureStore(client, online_fields(spec)),
            cache=EntityCache(
                max_entities=param_int(config, "cache_max_entities", 10_000),
                ttl_s=param_float(config, "cache_ttl_s", 5.0),
            ),
            breaker=self._breaker,
            key_prefix=get_param(config, "key_prefix", DEFAULT_KEY_PREFIX) or DEFAULT_KEY_PREFIX,
        )
        self._client = client
        labels = {"model": args["model_name"], "version": args["model_version"]}
        groups = list(self._assembler.stats().imputed)
        self._metrics = _Metrics(
            labels, groups, self._breaker, param_float(config, "metrics_interval_s", 1.0)
        )
        try:  # open the connection now rather than on the first request
            client.ping()
        except Exception as exc:  # Redis may come up later; the breaker handles outages
            logger.warning("redis %s not reachable at load: %s", redis_url, exc)
        logger.info("feature assembler ready: %d features, redis %s", spec.n_features, redis_url)

    def execute(self, requests: list[Any]) -> list[Any]:
        parsed = [_read_request(request) for request in requests]
        inputs = [item for item in parsed if isinstance(item, AssemblyInput)]
        before = self._assembler.stats()
        try:
            assembled = iter(self._assembler.assemble(inputs))
        except Exception as exc:
            logger.exception("feature assembly failed for a batch of %d requests", len(requests))
            error = pb_utils.TritonError(f"feature assembly failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        results = [next(assembled) if isinstance(item, AssemblyInput) else item for item in parsed]
        try:
            self._metrics.record(before, self._assembler.stats())
        except Exception:
            logger.exception("publishing feature assembler metrics failed")
        return [_response(result) for result in results]

    def finalize(self) -> None:
        try:
            self._metrics.publish()
        except Exception:
            logger.exception("publishing feature assembler metrics failed")
        self._client.close()
