"""The one shared async gRPC client to Triton, speaking the fraud ensembles' tensor contract.

Inputs: ``user_id``, ``merchant_id`` BYTES [1, 1] and ``context`` FP32 [1, 10]; outputs:
prediction, label, confidence, degraded, degraded_reason, imputed_count, features. Every call
carries a client timeout (the request's remaining budget) and the request id as Triton's
request id. gRPC failures become typed gateway errors with Triton's message kept:

==================================  ===============================================
gRPC status                         error
==================================  ===============================================
UNAVAILABLE (refused, unreachable)  UpstreamUnavailable (503, fallback may serve)
NOT_FOUND (model not loaded)        ModelNotReady (503, fallback may serve)
RESOURCE_EXHAUSTED (queue full)     UpstreamOverloaded (503, fallback may serve)
DEADLINE_EXCEEDED                   DeadlineExceeded (504, fallback may serve)
INVALID_ARGUMENT                    InvalidRequest (422)
anything else                       UpstreamError (503, fallback may serve)
==================================  ===============================================
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    InvalidRequest,
    ModelNotReady,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamUnavailable,
)
from gateway.metrics import GatewayMetrics
from rtinfer.client import OUTPUTS, ensemble_inputs


@dataclass(frozen=True)
class InferenceResult:
    """One row of an ensemble response."""

    prediction: float
    label: str
    confidence: float
    degraded: bool
    degraded_reason: str
    imputed_count: int
    features: list[float]


@dataclass(frozen=True)
class ModelState:
    """A model version as Triton's repository index reports it."""

    name: str
    version: str
    state: str
    reason: str


class TritonClient:
    """Async wrapper around ``tritonclient.grpc.aio``; create and close it on the serving loop."""

    def __init__(self, url: str, metrics: GatewayMetrics | None = None) -> None:
        self.url = url
        self._client = grpcaio.InferenceServerClient(url)
        self._metrics = metrics
        self._requested = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]

    async def close(self) -> None:
        await self._client.close()

    async def infer(
        self,
        endpoint: str,
        user_id: str,
        merchant_id: str,
        context: Sequence[float],
        *,
        request_id: str,
        timeout_s: float,
    ) -> InferenceResult:
        """Score one row with the ensemble ``endpoint``."""
        inputs = ensemble_inputs(grpcclient, [user_id], [merchant_id], [context])
        started = time.perf_counter()
        outcome = "ok"
        try:
            result = await self._client.infer(
                endpoint,
                inputs,
                outputs=self._requested,
                request_id=request_id,
                client_timeout=timeout_s,
            )
        except InferenceServerException as exc:
            error = self._map_error(exc, endpoint)
            outcome = error.code
            raise error from None
        finally:
            if self._metrics is not None:
                self._metrics.triton_seconds.labels(endpoint, outcome).observe(
                    time.perf_counter() - started
                )
        return InferenceResult(
            prediction=float(result.as_numpy("prediction")[0][0]),
            label=_text(result.as_numpy("label")[0][0]),
            confidence=float(result.as_numpy("confidence")[0][0]),
            degraded=bool(result.as_numpy("degraded")[0][0]),
            degraded_reason=_text(result.as_numpy("degraded_reason")[0][0]),
            imputed_count=int(result.as_numpy("imputed_count")[0][0]),
            features=result.as_numpy("features")[0].tolist(),
        )

    async def is_server_ready(self, timeout_s: float) -> bool:
        try:
            return bool(await self._client.is_server_ready(client_timeout=timeout_s))
        except InferenceServerException as exc:
            raise self._map_error(exc, "server") from None

    async def is_model_ready(self, endpoint: str, timeout_s: float) -> bool:
        try:
            return bool(await self._client.is_model_ready(endpoint, client_timeout=timeout_s))
        except InferenceServerException as exc:
            raise self._map_error(exc, endpoint) from None

    async def model_states(self, timeout_s: float) -> list[ModelState]:
        """Every model version in Triton's repository index (loaded or not)."""
        try:
            index = await self._client.get_model_repository_index(client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise self._map_error(exc, "repository index") from None
        return [ModelState(m.name, m.version, m.state, m.reason) for m in index.models]

    def _map_error(self, exc: InferenceServerException, endpoint: str) -> GatewayError:
        status = str(exc.status() or "")
        text = exc.message() or str(exc)
        where = f"triton {self.url} ({endpoint})"
        if status.endswith("INVALID_ARGUMENT"):
            return InvalidRequest(f"rejected by {endpoint}: {text}")
        if status.endswith("DEADLINE_EXCEEDED"):
            return DeadlineExceeded(f"{where}: no answer within the deadline: {text}")
        if status.endswith("NOT_FOUND"):
            return ModelNotReady(f"{where}: model not loaded: {text}")
        if status.endswith("RESOURCE_EXHAUSTED"):
            return UpstreamOverloaded(f"{where}: overloaded: {text}")
        if status.endswith("UNAVAILABLE"):
            return UpstreamUnavailable(f"{where} unavailable: {text}")
        return UpstreamError(f"{where} failed ({status or 'no status'}): {text}")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
