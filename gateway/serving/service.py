"""The prediction path, independent of the transport that delivered the request.

``PredictionService.predict`` runs the named stages

* ``route``: the model's catalog entry and the user's sticky traffic arm;
* ``infer``: the arm's Triton ensemble, with the request's remaining deadline as timeout;
* ``fallback`` (only when Triton is unavailable, the model not ready or the deadline spent):
  the deployment's ``fallback_config`` serves a degraded answer; without one the typed error
  propagates;
* ``log`` (after the response is computed, from the event loop's next turn): the record goes
  to the prediction log and one JSON line to the ``gateway`` log;
* ``shadow`` (after that, off the request path): the request is mirrored to the model's
  shadow deployments (``gateway/serving/shadow.py``); they never delay or change the response.

Each stage's time goes to ``rtinfer_gateway_stage_seconds{stage}``. The REST route calls this
object; so will any other door (e.g. a Kafka worker).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gateway.catalog.records import Deployment
from gateway.catalog.snapshot import Catalog, ModelEntry
from gateway.catalog.traffic import Route
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    GatewayOverloaded,
    ModelNotFound,
    UpstreamFailure,
    UpstreamUnavailable,
)
from gateway.logs import model_var, model_version_var, request_id_var
from gateway.metrics import GatewayMetrics
from gateway.schemas import PredictRequest, PredictResponse
from gateway.serving.health import HealthTracker
from gateway.serving.shadow import ShadowMirror
from gateway.serving.triton_client import TritonClient
from python_backend.contract import InferenceResult
from python_backend.predlog.sink import PredictionLog

log = logging.getLogger(__name__)

#: model label of requests for a model the catalog does not know (bounded label values)
UNKNOWN_MODEL = "unknown"


class _Stages:
    """Times named stages into the stage histogram and keeps them (ms) for the record."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._histogram = metrics.stage_seconds
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.ms[name] = round(elapsed * 1000.0, 3)
            self._histogram.labels(name).observe(elapsed)


class PredictionService:
    """route -> infer -> fallback -> log, shared by every door."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        triton: TritonClient,
        metrics: GatewayMetrics,
        health: HealthTracker,
        prediction_log: PredictionLog,
        default_deadline_ms: int,
        shadow_timeout_ms: int = 500,
        shadow_max_in_flight: int = 32,
        max_in_flight: int = 0,
        door: str = "gateway",
    ) -> None:
        self._catalog = catalog
        self._door = door
        self._triton = triton
        self._metrics = metrics
        self._health = health
        self._prediction_log = prediction_log
        self._default_deadline_ms = default_deadline_ms
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._shadow = ShadowMirror(
            triton=triton,
            prediction_log=prediction_log,
            metrics=metrics,
            timeout_s=shadow_timeout_ms / 1000.0,
            max_in_flight=shadow_max_in_flight,
        )

    async def close(self) -> None:
        """Wait for the shadow calls still in flight (before the prediction log closes)."""
        await self._shadow.close()

    async def predict(
        self,
        model_name: str,
        request: PredictRequest,
        *,
        request_id: str,
        received_at: float | None = None,
    ) -> PredictResponse:
        """Serve one prediction; ``received_at`` is the ``time.perf_counter()`` of arrival."""
        started = time.perf_counter() if received_at is None else received_at
        timestamp = time.time() - (time.perf_counter() - started)
        # the budget counts from here: authentication (a cold key costs a scrypt hash) and
        # body parsing are not the model's time; latency_ms still counts from arrival
        deadline = time.perf_counter() + (request.deadline_ms or self._default_deadline_ms) / 1e3
        stages = _Stages(self._metrics)
        tokens = (
            (request_id_var, request_id_var.set(request_id)),
            (model_var, model_var.set(model_name)),
            (model_version_var, model_version_var.set(None)),
        )
        route: Route | None = None
        try:
            with stages("route"):
                entry, route = self._route(model_name, request.entity_ids.user_id)
            deployment = route.deployment
            model_version_var.set(deployment.model_version)
            with stages("infer"):
                result, failure = await self._infer_admitted(
                    deployment, request, request_id, deadline
                )
            if result is not None:
                response = _response(model_name, route, result, request_id, started)
            else:
                assert failure is not None
                with stages("fallback"):
                    response = self._fallback(model_name, route, failure, request_id, started)
            record = self._finish(route, request, response, result, stages, timestamp)
            if entry.shadows:
                asyncio.get_running_loop().call_soon(
                    self._shadow.mirror, entry.shadows, request, record
                )
            return response
        except Exception as exc:
            self._finish_error(model_name, request_id, route, exc, stages, started)
            raise
        finally:
            for var, token in tokens:
                var.reset(token)

    async def _infer_admitted(
        self, deployment: Deployment, request: PredictRequest, request_id: str, deadline: float
    ) -> tuple[InferenceResult | None, UpstreamFailure | None]:
        """Triton's answer, or the failure the fallback answers for (shed load included)."""
        try:
            self._admit()
            self._in_flight += 1
            try:
                return await self._infer(deployment, request, request_id, deadline), None
            finally:
                self._in_flight -= 1
        except UpstreamFailure as exc:
            return None, exc

    def _admit(self) -> None:
        """Shed load: past ``max_in_flight`` predictions waiting on Triton, the fallback
        answers at once (the rest would only queue behind them and miss their deadlines)."""
        if self._max_in_flight and self._in_flight >= self._max_in_flight:
            raise GatewayOverloaded(
                f"{self._in_flight} predictions in progress in this worker "
                f"(max_in_flight {self._max_in_flight})"
            )

    def _route(self, model_name: str, user_id: str) -> tuple[ModelEntry, Route]:
        if not self._catalog.loaded:
            raise UpstreamUnavailable("the model catalog has not been loaded yet")
        entry = self._catalog.get(model_name)
        if entry is None:
            raise ModelNotFound(f"unknown model {model_name!r}")
        route = entry.routing.choose(model_name, user_id)
        if route is None:
            raise UpstreamUnavailable(
                f"model {model_name!r} has no active deployment receiving traffic"
            )
        return entry, route

    async def _infer(
        self, deployment: Deployment, request: PredictRequest, request_id: str, deadline: float
    ) -> InferenceResult:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline was spent before inference")
        return await self._triton.infer(
            deployment.serving_endpoint,
            request.entity_ids.user_id,
            request.entity_ids.merchant_id,
            request.context_vector(),
            request_id=request_id,
            timeout_s=remaining,
        )

    def _fallback(
        self,
        model_name: str,
        route: Route,
        failure: UpstreamFailure,
        request_id: str,
        started: float,
    ) -> PredictResponse:
        fallback = route.deployment.fallback
        if fallback is None:
            raise failure
        served = fallback.serve()
        log.warning("serving the %s fallback: %s", fallback.type, failure.message)
        return PredictResponse(
            prediction=served.prediction,
            label=served.label,
            confidence=served.confidence,
            model_name=model_name,
            model_version=route.deployment.model_version,
            deployment_arm=route.arm,
            degraded=True,
            degraded_reason=f"{failure.reason}:{fallback.type}",
            request_id=request_id,
            latency_ms=_ms_since(started),
        )

    def _finish(
        self,
        route: Route,
        request: PredictRequest,
        response: PredictResponse,
        result: InferenceResult | None,
        stages: _Stages,
        timestamp: float,
    ) -> dict[str, Any]:
        """Count the prediction and schedule its log record; the record is returned."""
        deployment = route.deployment
        model = response.model_name
        self._metrics.requests.labels(model, route.arm, "200").inc()
        if response.degraded:
            self._metrics.degraded.labels(model, response.degraded_reason or "").inc()
        self._health.record(
            model,
            degraded=response.degraded,
            degraded_reason=response.degraded_reason,
            inference_latency_ms=stages.ms["infer"] if result is not None else None,
        )
        record: dict[str, Any] = {
            "request_id": response.request_id,
            "timestamp": timestamp,
            "model_name": model,
            "model_version": deployment.model_version,
            "deployment_id": deployment.deployment_id,
            "arm": route.arm,
            "serving_endpoint": deployment.serving_endpoint,
            "door": self._door,
            "entity_ids": request.entity_ids.model_dump(),
            "context": dict(request.context),
            "feature_overrides": dict(request.feature_overrides or {}),
            "features": result.features if result is not None else [],
            "prediction": response.prediction,
            "label": response.label,
            "confidence": response.confidence,
            "degraded": response.degraded,
            "degraded_reason": response.degraded_reason,
            "latency_ms": response.latency_ms,
            "stage_latency_ms": dict(stages.ms),
        }
        # the journal append happens before the answer leaves (a process killed right after
        # answering must not lose the record); the log line can wait for the next loop turn
        self._log_prediction(record)
        asyncio.get_running_loop().call_soon(self._log_event, record)
        return record

    def _finish_error(
        self,
        model_name: str,
        request_id: str,
        route: Route | None,
        exc: Exception,
        stages: _Stages,
        started: float,
    ) -> None:
        status = exc.status if isinstance(exc, GatewayError) else 500
        model = model_name if route is not None or self._catalog.get(model_name) else UNKNOWN_MODEL
        arm = route.arm if route is not None else "none"
        self._metrics.requests.labels(model, arm, str(status)).inc()
        fields = {
            "event": "prediction_failed",
            "request_id": request_id,
            "model": model_name,
            "model_version": route.deployment.model_version if route is not None else None,
            "status": status,
            "code": exc.code if isinstance(exc, GatewayError) else "internal_error",
            "error": exc.message if isinstance(exc, GatewayError) else repr(exc),
            "arm": arm,
            "deployment_id": route.deployment.deployment_id if route is not None else None,
            "latency_ms": _ms_since(started),
            "stage_latency_ms": dict(stages.ms),
        }
        if isinstance(exc, GatewayError):
            exc.logged = True
        asyncio.get_running_loop().call_soon(self._log_line, logging.INFO, "prediction", fields)

    def _log_prediction(self, record: dict[str, Any]) -> None:
        started = time.perf_counter()
        try:
            self._prediction_log.log(record)
        except Exception:
            self._metrics.prediction_log_errors.inc()
            log.exception("prediction log failed; record %s lost", record["request_id"])
        self._metrics.stage_seconds.labels("log").observe(time.perf_counter() - started)

    def _log_event(self, record: dict[str, Any]) -> None:
        fields = {
            "event": "prediction",
            "request_id": record["request_id"],
            "model": record["model_name"],
            "model_version": record["model_version"],
            "status": 200,
            "arm": record["arm"],
            "deployment_id": record["deployment_id"],
            "label": record["label"],
            "prediction": record["prediction"],
            "degraded": record["degraded"],
            "degraded_reason": record["degraded_reason"],
            "latency_ms": record["latency_ms"],
            "stage_latency_ms": record["stage_latency_ms"],
        }
        self._log_line(logging.INFO, "prediction", fields)

    @staticmethod
    def _log_line(level: int, msg: str, fields: dict[str, Any]) -> None:
        log.log(level, msg, extra={"fields": fields})


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


def _response(
    model_name: str, route: Route, result: InferenceResult, request_id: str, started: float
) -> PredictResponse:
    return PredictResponse(
        prediction=result.prediction,
        label=result.label,
        confidence=result.confidence,
        model_name=model_name,
        model_version=route.deployment.model_version,
        deployment_arm=route.arm,
        degraded=result.degraded,
        degraded_reason=result.degraded_reason or None,
        request_id=request_id,
        latency_ms=_ms_since(started),
    )
