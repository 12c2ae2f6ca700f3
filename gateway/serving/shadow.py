"""Shadow deployments: mirror served requests to a model's shadow versions, off the request path.

After the production response of a model is computed, ``PredictionService`` hands the request
and its production record to :meth:`ShadowMirror.mirror` on the event loop's next turn. For
each active shadow deployment of the model:

* **sample**: the request is mirrored when ``shadow_bucket(model, request_id)`` is below the
  shadow's ``shadow_sample_pct``. The bucket is a hash of the request id, so a retried request
  (same id) is mirrored again or not at all, and every shadow of a model with the same share
  gets the same requests (a request sampled at 10% is also sampled at 50%);
* **bound**: at most ``max_in_flight`` shadow calls run at once per process; a request beyond
  that is dropped for that shadow and counted (``outcome="dropped"``), never queued;
* **call**: the shadow's Triton ensemble, same inputs and request id as production, with its
  own timeout (``timeout_s``), independent of the client's deadline;
* **record**: the answer goes to the prediction log with ``arm = "shadow"``, the production
  request's ``request_id`` and ``timestamp``, and a ``production`` object with what production
  served. A failed call (Triton error, timeout, anything raised) becomes a record whose
  ``error`` names the failure, so analysts see a shadow's failure rate; it is never raised.

The production response is built before any of this is scheduled, so a shadow can neither
delay nor change it. Tasks are kept until they finish; :meth:`ShadowMirror.close` waits for
them on shutdown (before the prediction log closes).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from gateway.catalog.records import Deployment
from gateway.errors import GatewayError
from gateway.logs import model_version_var
from gateway.metrics import GatewayMetrics
from gateway.schemas import PredictRequest
from python_backend.contract import InferenceResult
from python_backend.predlog.sink import PredictionLog

log = logging.getLogger(__name__)

SHADOW_ARM = "shadow"
#: fields of the production record copied into ``production`` of each shadow record
PRODUCTION_FIELDS = (
    "model_version",
    "deployment_id",
    "arm",
    "serving_endpoint",
    "prediction",
    "label",
    "confidence",
    "degraded",
    "degraded_reason",
    "latency_ms",
)
_HASH_RANGE = float(2**64)


class Inference(Protocol):
    """The part of ``TritonClient`` a shadow call uses."""

    async def infer(
        self,
        endpoint: str,
        user_id: str,
        merchant_id: str,
        context: Sequence[float],
        *,
        request_id: str,
        timeout_s: float,
    ) -> InferenceResult: ...


def shadow_bucket(model_name: str, request_id: str) -> float:
    """Deterministic point in [0, 100) of a request of a model, for shadow sampling."""
    key = f"{model_name}\x00shadow\x00{request_id}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_RANGE * 100.0


def sampled(model_name: str, request_id: str, sample_pct: float) -> bool:
    """Whether a shadow with ``sample_pct`` receives this request."""
    return shadow_bucket(model_name, request_id) < sample_pct


def shadow_record(
    production: Mapping[str, Any],
    shadow: Deployment,
    result: InferenceResult | None,
    error: tuple[str, str] | None,
    latency_ms: float,
) -> dict[str, Any]:
    """The prediction-log record of one shadow call (``result`` or ``error`` is set)."""
    return {
        "request_id": production["request_id"],
        "timestamp": production["timestamp"],
        "model_name": shadow.model_name,
        "model_version": shadow.model_version,
        "deployment_id": shadow.deployment_id,
        "arm": SHADOW_ARM,
        "serving_endpoint": shadow.serving_endpoint,
        "door": production.get("door", "gateway"),
        "entity_ids": production["entity_ids"],
        "context": production["context"],
        "feature_overrides": production["feature_overrides"],
        "features": result.features if result is not None else [],
        "prediction": result.prediction if result is not None else None,
        "label": result.label if result is not None else None,
        "confidence": result.confidence if result is not None else None,
        "degraded": result.degraded if result is not None else False,
        "degraded_reason": (result.degraded_reason or None) if result is not None else None,
        "latency_ms": latency_ms,
        "stage_latency_ms": {"infer": latency_ms},
        "sample_pct": shadow.shadow_sample_pct,
        "error": {"code": error[0], "message": error[1]} if error is not None else None,
        "production": {name: production[name] for name in PRODUCTION_FIELDS},
    }


class ShadowMirror:
    """Fire-and-forget shadow calls with a cap on those in flight; see the module doc."""

    def __init__(
        self,
        *,
        triton: Inference,
        prediction_log: PredictionLog,
        metrics: GatewayMetrics,
        timeout_s: float,
        max_in_flight: int,
    ) -> None:
        self._triton = triton
        self._prediction_log = prediction_log
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def mirror(
        self,
        shadows: Sequence[Deployment],
        request: PredictRequest,
        production: Mapping[str, Any],
    ) -> None:
        """Start a call to each shadow that samples this request. Returns at once; never raises."""
        try:
            request_id = production["request_id"]
            for shadow in shadows:
                if not sampled(shadow.model_name, request_id, shadow.shadow_sample_pct):
                    continue
                if self._closed or len(self._tasks) >= self._max_in_flight:
                    self._metrics.shadow_requests.labels(shadow.model_name, "dropped").inc()
                    continue
                task = asyncio.get_running_loop().create_task(
                    self._call(shadow, request, production),
                    name=f"shadow-{shadow.deployment_id}",
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except Exception:
            log.exception("mirroring to the shadow deployments failed")

    async def close(self, timeout_s: float | None = None) -> None:
        """Take no new shadow calls; wait for those in flight (cancelled after ``timeout_s``,
        by default the call timeout plus a second)."""
        self._closed = True
        pending = set(self._tasks)
        if not pending:
            return
        wait_s = self._timeout_s + 1.0 if timeout_s is None else timeout_s
        _, late = await asyncio.wait(pending, timeout=wait_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def _call(
        self, shadow: Deployment, request: PredictRequest, production: Mapping[str, Any]
    ) -> None:
        model_version_var.set(shadow.model_version)  # this task's copy of the request context
        started = time.perf_counter()
        result: InferenceResult | None = None
        error: tuple[str, str] | None = None
        try:
            result = await asyncio.wait_for(
                self._triton.infer(
                    shadow.serving_endpoint,
                    request.entity_ids.user_id,
                    request.entity_ids.merchant_id,
                    request.context_vector(),
                    request_id=production["request_id"],
                    timeout_s=self._timeout_s,
                ),
                self._timeout_s,
            )
        except asyncio.TimeoutError:
            error = ("deadline_exceeded", f"no answer within {self._timeout_s * 1000:.0f} ms")
        except GatewayError as exc:
            error = (exc.code, exc.message)
        except Exception as exc:
            error = ("internal_error", f"{type(exc).__name__}: {exc}")
            log.warning("shadow call to %s raised", shadow.serving_endpoint, exc_info=True)
        elapsed = time.perf_counter() - started
        outcome = "ok" if error is None else "error"
        self._metrics.shadow_requests.labels(shadow.model_name, outcome).inc()
        self._metrics.shadow_seconds.labels(shadow.model_name, outcome).observe(elapsed)
        record = shadow_record(production, shadow, result, error, round(elapsed * 1000.0, 3))
        try:
            self._prediction_log.log(record)
        except Exception:
            self._metrics.prediction_log_errors.inc()
            log.exception("prediction log failed; shadow record %s lost", record["request_id"])
        fields = {
            "event": "shadow_prediction",
            "deployment_id": shadow.deployment_id,
            "serving_endpoint": shadow.serving_endpoint,
            "outcome": outcome,
            "prediction": record["prediction"],
            "production_prediction": production["prediction"],
            "latency_ms": record["latency_ms"],
            "error": record["error"],
        }
        level = logging.DEBUG if error is None else logging.INFO
        log.log(level, "shadow prediction", extra={"fields": fields})
