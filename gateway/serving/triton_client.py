"""The one shared async gRPC client to Triton, speaking the fraud ensembles' tensor contract.

Concurrent predictions for the same ensemble are **coalesced**: at most ``max_calls`` calls
per ensemble are in flight; rows arriving while they are busy wait for the next call and go
out together (up to ``max_batch_rows``), as one multi-row request. At low load every row is
sent at once on its own (no added latency); under load one call's client CPU (hundreds of
microseconds in Python's gRPC) is shared by the batch, and Triton's dynamic batcher gets
fewer, larger requests. Each row keeps its own deadline: a row whose time runs out stops
waiting (``DeadlineExceeded``) without cancelling the call its neighbours ride on, and a
multi-row call rejected with INVALID_ARGUMENT is retried row by row, so only the offending
row gets the 422.

Inputs: ``user_id``, ``merchant_id`` BYTES [1, 1] and ``context`` FP32 [1, 10]; outputs:
prediction, label, confidence, degraded, degraded_reason, imputed_count, features. Every call
carries the request's remaining budget as Triton's own request ``timeout`` (microseconds; the
ensemble passes it to each step, the postprocess step bounds its fallback call by it, and a
model whose queue policy allows the override drops the request from its queue once it
expires) and the request id as Triton's request id. Rows stop waiting at their deadline, but
the gRPC call itself may run ``call_grace_s`` longer: a call is not cancelled just because
its callers gave up, so Triton's real answer (an error that opens the guard) is still seen,
and a burst of late answers does not become a burst of RST_STREAMs, which Triton's gRPC
server answers by closing the whole connection. The channel reconnects within ~0.1 s when it
is closed anyway. An
:class:`~gateway.serving.endpoint_guard.EndpointGuard` fails calls to an endpoint fast while Triton
reports it broken. gRPC failures become typed gateway errors with Triton's message kept:

==================================  ===============================================
gRPC status                         error
==================================  ===============================================
UNAVAILABLE (refused, unreachable)  UpstreamUnavailable (503, fallback may serve)
NOT_FOUND (model not loaded)        ModelNotReady (503, fallback may serve)
RESOURCE_EXHAUSTED (queue full)     UpstreamOverloaded (503, fallback may serve)
DEADLINE_EXCEEDED, UNAVAILABLE with   DeadlineExceeded (504, fallback may serve)
"Request timeout expired"
INVALID_ARGUMENT                    InvalidRequest (422)
anything else                       UpstreamError (503, fallback may serve)
==================================  ===============================================
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import service_pb2_grpc
from tritonclient.grpc._client import MAX_GRPC_MESSAGE_SIZE
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
from gateway.serving.endpoint_guard import EndpointGuard
from gateway.serving.infer_proto import MalformedResponse, infer_request, results
from python_backend.contract import (
    CONTEXT_FEATURES,
    LOGGED_BY_GATEWAY,
    LOGGED_BY_PROBE,
    InferenceResult,
)

#: entity ids of guard and health probes (never logged; unknown entities get defaults)
PROBE_ENTITY = "__rtinfer_probe__"
#: Triton's message when a queued request outlived its ``timeout``
QUEUE_TIMEOUT_MESSAGE = "Request timeout expired"


def channel_args() -> list[tuple[str, int]]:
    """tritonclient's default channel options, plus a fast reconnect: a connection the
    server closed comes back after 0.1-1 s instead of gRPC's default 1-120 s backoff."""
    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


@dataclass(frozen=True)
class ModelState:
    """A model version as Triton's repository index reports it."""

    name: str
    version: str
    state: str
    reason: str


@dataclass
class _Row:
    user_id: str
    merchant_id: str
    context: Sequence[float]
    request_id: str
    deadline: float  # time.monotonic()
    future: asyncio.Future[InferenceResult]


@dataclass
class _Lane:
    """The rows waiting for, and the calls in flight to, one ensemble."""

    waiting: deque[_Row] = field(default_factory=deque)
    in_flight: int = 0


class TritonClient:
    """Async wrapper around ``tritonclient.grpc.aio``; create and close it on the serving loop."""

    def __init__(
        self,
        url: str,
        metrics: GatewayMetrics | None = None,
        *,
        max_calls: int = 4,
        max_batch_rows: int = 32,
        call_grace_s: float = 1.0,
    ) -> None:
        if max_calls < 1 or max_batch_rows < 1:
            raise ValueError("max_calls and max_batch_rows must be at least 1")
        self.url = url
        # admin calls (readiness, configs, the repository index) through tritonclient;
        # inference, the hot path, as raw protobufs on a channel of its own
        self._client = grpcaio.InferenceServerClient(url, channel_args=channel_args())
        self._channel = grpc.aio.insecure_channel(url, options=channel_args())
        self._model_infer = service_pb2_grpc.GRPCInferenceServiceStub(self._channel).ModelInfer
        self._call_grace_s = call_grace_s
        self._metrics = metrics
        self._max_calls = max_calls
        self._max_batch_rows = max_batch_rows
        self._lanes: dict[str, _Lane] = {}
        self._calls: set[asyncio.Task[None]] = set()
        self.guard = EndpointGuard(self.probe, metrics)
        self._probes = 0

    async def close(self) -> None:
        await self.guard.close()
        for task in list(self._calls):
            task.cancel()
        await asyncio.gather(*self._calls, return_exceptions=True)
        await self._channel.close()
        await self._client.close()

    async def probe(self, endpoint: str, timeout_s: float) -> InferenceResult:
        """One probe row through ``endpoint``, outside the lanes and the guard. Its entity id
        is new each time, so the assembler's hot-entity cache cannot answer for Redis."""
        loop = asyncio.get_running_loop()
        self._probes += 1
        entity = f"{PROBE_ENTITY}{self._probes}"
        row = _Row(
            entity,
            entity,
            [float("nan")] * len(CONTEXT_FEATURES),
            "probe",
            time.monotonic() + timeout_s,
            loop.create_future(),
        )
        (result,) = await self._infer_rows(endpoint, [row], grace_s=0.0, logged_by=LOGGED_BY_PROBE)
        return result

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
        """Score one row with the ensemble ``endpoint`` (coalesced with concurrent rows)."""
        if timeout_s <= 0:
            raise DeadlineExceeded(f"triton {self.url} ({endpoint}): no time left for the call")
        self.guard.check(endpoint)
        loop = asyncio.get_running_loop()
        row = _Row(
            user_id,
            merchant_id,
            context,
            request_id,
            time.monotonic() + timeout_s,
            loop.create_future(),
        )
        lane = self._lanes.setdefault(endpoint, _Lane())
        lane.waiting.append(row)
        self._dispatch(endpoint, lane)
        try:
            # shield: a row giving up must not cancel the call its neighbours ride on
            return await asyncio.wait_for(asyncio.shield(row.future), timeout_s)
        except asyncio.TimeoutError:
            self.guard.timed_out(endpoint)
            raise DeadlineExceeded(
                f"triton {self.url} ({endpoint}): no answer within the deadline"
            ) from None

    def _dispatch(self, endpoint: str, lane: _Lane) -> None:
        """Start calls while the lane has rows waiting and room for another call."""
        while lane.waiting and lane.in_flight < self._max_calls:
            now = time.monotonic()
            rows: list[_Row] = []
            while lane.waiting and len(rows) < self._max_batch_rows:
                row = lane.waiting.popleft()
                if row.future.done():
                    continue  # its caller gave up while it waited
                if row.deadline <= now:
                    continue  # wait_for has or will have raised DeadlineExceeded
                rows.append(row)
            if not rows:
                return
            lane.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._call(endpoint, lane, rows))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _call(self, endpoint: str, lane: _Lane, rows: list[_Row]) -> None:
        try:
            try:
                results = await self._infer_rows(endpoint, rows)
            except InvalidRequest:
                if len(rows) == 1:
                    raise
                # one row may be bad: find it, serve the others
                for row in rows:
                    try:
                        _settle(row, (await self._infer_rows(endpoint, [row]))[0])
                    except GatewayError as err:
                        _fail(row, err)
                return
            self.guard.succeeded(endpoint)
            for row, result in zip(rows, results, strict=True):
                _settle(row, result)
        except GatewayError as err:
            if not isinstance(err, InvalidRequest):
                self.guard.failed(endpoint, err)
            for row in rows:
                _fail(row, err)
        except BaseException as err:  # cancelled on close, or a bug: never strand a caller
            for row in rows:
                _fail(row, UpstreamError(f"triton {self.url} ({endpoint}) call failed: {err!r}"))
            if isinstance(err, asyncio.CancelledError):
                raise
        finally:
            lane.in_flight -= 1
            self._dispatch(endpoint, lane)

    async def _infer_rows(
        self,
        endpoint: str,
        rows: list[_Row],
        grace_s: float | None = None,
        logged_by: str = LOGGED_BY_GATEWAY,
    ) -> list[InferenceResult]:
        """One Triton request for ``rows``: Triton's ``timeout`` is the latest row deadline,
        the gRPC deadline ``grace_s`` (default ``call_grace_s``) later. ``logged_by`` tells the
        pipeline who logs the rows (the gateway's doors do; probes are not predictions)."""
        timeout_s = max(r.deadline for r in rows) - time.monotonic()
        request_id = (
            rows[0].request_id if len(rows) == 1 else f"{rows[0].request_id}+{len(rows) - 1}"
        )
        budget_s = max(timeout_s, 0.001)
        request = infer_request(
            endpoint,
            [r.user_id for r in rows],
            [r.merchant_id for r in rows],
            [r.context for r in rows],
            request_id=request_id,
            timeout_us=max(1, int(budget_s * 1e6)),
            logged_by=logged_by,
        )
        started = time.perf_counter()
        outcome = "ok"
        try:
            response = await self._model_infer(
                request,
                timeout=budget_s + (self._call_grace_s if grace_s is None else grace_s),
            )
            return results(response, len(rows))
        except grpc.aio.AioRpcError as exc:
            error = self._map_error(exc.code().name, exc.details() or "", endpoint)
            outcome = error.code
            raise error from None
        except MalformedResponse as exc:
            outcome = "upstream_error"
            raise UpstreamError(f"triton {self.url} ({endpoint}): {exc}") from None
        finally:
            if self._metrics is not None:
                self._metrics.triton_seconds.labels(endpoint, outcome).observe(
                    time.perf_counter() - started
                )
                self._metrics.triton_batch_rows.labels(endpoint).observe(len(rows))

    async def is_server_ready(self, timeout_s: float) -> bool:
        try:
            return bool(await self._client.is_server_ready(client_timeout=timeout_s))
        except InferenceServerException as exc:
            raise self._map_triton(exc, "server") from None

    async def is_model_ready(self, endpoint: str, timeout_s: float) -> bool:
        try:
            return bool(await self._client.is_model_ready(endpoint, client_timeout=timeout_s))
        except InferenceServerException as exc:
            raise self._map_triton(exc, endpoint) from None

    async def ensemble_steps(self, endpoint: str, timeout_s: float) -> list[tuple[str, int]]:
        """(model, version) of each step of ensemble ``endpoint``; -1: the newest loaded."""
        try:
            response = await self._client.get_model_config(endpoint, client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise self._map_triton(exc, endpoint) from None
        steps = response.config.ensemble_scheduling.step
        return [(step.model_name, int(step.model_version)) for step in steps]

    async def model_states(self, timeout_s: float) -> list[ModelState]:
        """Every model version in Triton's repository index (loaded or not)."""
        try:
            index = await self._client.get_model_repository_index(client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise self._map_triton(exc, "repository index") from None
        return [ModelState(m.name, m.version, m.state, m.reason) for m in index.models]

    def _map_triton(self, exc: InferenceServerException, endpoint: str) -> GatewayError:
        return self._map_error(str(exc.status() or ""), exc.message() or str(exc), endpoint)

    def _map_error(self, status: str, text: str, endpoint: str) -> GatewayError:
        """The typed error of a gRPC status (``StatusCode.X`` or ``X``) and message."""
        where = f"triton {self.url} ({endpoint})"
        if status.endswith("INVALID_ARGUMENT"):
            return InvalidRequest(f"rejected by {endpoint}: {text}")
        if status.endswith("DEADLINE_EXCEEDED") or QUEUE_TIMEOUT_MESSAGE in text:
            return DeadlineExceeded(f"{where}: no answer within the deadline: {text}")
        if status.endswith("NOT_FOUND"):
            return ModelNotReady(f"{where}: model not loaded: {text}")
        if status.endswith("RESOURCE_EXHAUSTED"):
            return UpstreamOverloaded(f"{where}: overloaded: {text}")
        if status.endswith("UNAVAILABLE"):
            return UpstreamUnavailable(f"{where} unavailable: {text}")
        return UpstreamError(f"{where} failed ({status or 'no status'}): {text}")


def _settle(row: _Row, result: InferenceResult) -> None:
    if not row.future.done():
        row.future.set_result(result)


def _fail(row: _Row, error: GatewayError) -> None:
    if not row.future.done():
        row.future.set_exception(error)
        row.future.exception()  # retrieved: a row that gave up must not log "never retrieved"
