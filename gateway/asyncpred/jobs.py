"""Running one async job: predict (the same ``PredictionService`` as the REST door), store the
result, deliver the callback, dead-letter what failed for good.

Steps of :meth:`JobRunner.run`, each of which a redelivered copy of the job can resume:

1. *settled?* The job's callback was delivered or the job dead-lettered: nothing to do.
2. *stored?* Else predict. Triton failures without a fallback (503/504) are retried with
   backoff up to ``predict_attempts``; client errors (model gone, invalid input) fail at
   once. The result (``done`` or ``failed``) is stored with ``SET NX``: a copy that finds a
   result stored uses that one, so a job is predicted again only if it crashed before the
   store.
3. *callback*, if the job has one (at least once; receivers dedupe on the delivery id).
4. *dead letter* (confirmed by Kafka) a failed prediction or an undeliverable callback.
5. mark the job settled. Only then may its offset be committed.

Redis or Kafka being down is not a job failure: those steps retry until they succeed (the
job's offset stays uncommitted meanwhile), and stop only when the worker shuts down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from gateway.asyncpred.backoff import Backoff
from gateway.asyncpred.callback_delivery import CallbackSender, DeliveryReport
from gateway.asyncpred.confirmed_producer import ConfirmedProducer, DeliveryFailed
from gateway.asyncpred.metrics import AsyncWorkerMetrics
from gateway.asyncpred.results import ResultStore, ResultStoreError
from gateway.asyncpred.schemas import AsyncJob, AsyncStatus
from gateway.errors import GatewayError, InternalError, UpstreamFailure
from gateway.schemas import ErrorDetail
from gateway.serving.service import PredictionService

log = logging.getLogger(__name__)

T = TypeVar("T")
#: what became of one message
RunOutcome = Literal["done", "failed", "dead_lettered", "already_settled", "invalid"]
DLQ_SCHEMA_VERSION = 1
#: delay ceiling of the retries of Redis and Kafka writes
INFRA_BACKOFF = Backoff(0.2, 5.0)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobRunner:
    def __init__(
        self,
        *,
        service: PredictionService,
        store: ResultStore,
        callbacks: CallbackSender,
        dead_letters: ConfirmedProducer,
        dlq_topic: str,
        metrics: AsyncWorkerMetrics,
        predict_attempts: int,
        backoff: Backoff,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._service = service
        self._store = store
        self._callbacks = callbacks
        self._dead_letters = dead_letters
        self._dlq_topic = dlq_topic
        self._metrics = metrics
        self._predict_attempts = predict_attempts
        self._backoff = backoff
        self._sleep = sleep
        self._worker = worker_id()

    async def run(self, key: bytes | None, value: bytes) -> RunOutcome:
        """Process one ``inference-requests`` message to the end (see the module doc)."""
        try:
            job = AsyncJob.model_validate_json(value)
        except ValidationError as exc:
            log.error("invalid async job message (key %r): %s", key, exc)
            await self.dead_letter_raw(key, value, "invalid_message")
            return "invalid"
        if await self._infra(lambda: self._store.is_settled(job.job_id)):
            self._metrics.duplicates.inc()
            return "already_settled"
        stored = await self._infra(lambda: self._store.get(job.job_id))
        if stored is None:
            status = await self._predict(job)
            body, created = await self._infra(
                lambda: self._store.put_if_absent(job.job_id, _encode(status))
            )
            if created:
                self._metrics.completed.labels(status.status).inc()
                self._metrics.job_seconds.observe(max(0.0, time.time() - job.submitted_at))
        else:
            body = stored
            self._metrics.duplicates.inc()
        status = AsyncStatus.model_validate_json(body)
        report: DeliveryReport | None = None
        if job.callback_url is not None:
            report = await self._callbacks.deliver(job.callback_url, job.job_id, body)
            if not report.delivered:
                log.warning(
                    "callback of job %s failed after %d attempts: %s",
                    job.job_id, report.attempts, report.last.detail,
                )  # fmt: skip
        outcome: RunOutcome = "done" if status.status == "done" else "failed"
        reason = None
        if status.status == "failed":
            reason = "prediction_failed"
        elif report is not None and not report.delivered:
            reason = "callback_failed"
        if reason is not None:
            await self._dead_letter(
                job.job_id.encode(),
                reason,
                {
                    "job": json.loads(value),
                    "status": json.loads(body),
                    "callback": _report_fields(report),
                },
            )
            outcome = "dead_lettered"
        await self._infra(lambda: self._store.mark_settled(job.job_id))
        return outcome

    async def _predict(self, job: AsyncJob) -> AsyncStatus:
        request_id = job.request.request_id or job.job_id
        error: GatewayError = InternalError("not attempted")
        for attempt in range(1, self._predict_attempts + 1):
            try:
                response = await self._service.predict(
                    job.model_name, job.request, request_id=request_id
                )
            except UpstreamFailure as exc:  # Triton down/overloaded/slow, and no fallback
                error = exc
            except GatewayError as exc:  # the request itself is wrong now: no retry
                return _status(job, request_id, error=exc)
            except Exception as exc:
                log.exception("async job %s: prediction raised", job.job_id)
                error = InternalError(f"internal error: {type(exc).__name__}")
            else:
                return _status(job, request_id, result=response)
            if attempt < self._predict_attempts:
                self._metrics.prediction_retries.inc()
                await self._sleep(self._backoff.delay(attempt))
        return _status(job, request_id, error=error)

    async def dead_letter_raw(self, key: bytes | None, value: bytes, reason: str) -> None:
        """Park a message that cannot be run as a job (unreadable, or it made the worker fail)."""
        await self._dead_letter(key or b"", reason, {"raw": value.decode(errors="replace")})

    async def _dead_letter(self, key: bytes, reason: str, fields: dict[str, Any]) -> None:
        message = {
            "schema_version": DLQ_SCHEMA_VERSION,
            "reason": reason,
            **fields,
            "dead_lettered_at": time.time(),
            "worker": self._worker,
        }
        value = json.dumps(message, separators=(",", ":")).encode()
        await self._infra(
            lambda: self._dead_letters.send(
                self._dlq_topic, key, value, {"reason": reason.encode()}
            )
        )
        self._metrics.dead_lettered.labels(reason).inc()

    async def _infra(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` until Redis/Kafka take it; cancellation (shutdown) ends the wait."""
        attempt = 0
        while True:
            try:
                return await call()
            except (ResultStoreError, DeliveryFailed) as exc:
                attempt += 1
                if attempt & (attempt - 1) == 0:  # 1st, 2nd, 4th, ... failure
                    log.warning(
                        "async job step failed (%d times so far), retrying: %s", attempt, exc
                    )
                await self._sleep(INFRA_BACKOFF.delay(attempt))


def _status(
    job: AsyncJob,
    request_id: str,
    *,
    result: Any = None,
    error: GatewayError | None = None,
) -> AsyncStatus:
    return AsyncStatus(
        token=job.token,
        status="done" if error is None else "failed",
        model_name=job.model_name,
        request_id=request_id,
        result=result,
        error=ErrorDetail(code=error.code, message=error.message) if error is not None else None,
        submitted_at=job.submitted_at,
        completed_at=time.time(),
    )


def _encode(status: AsyncStatus) -> bytes:
    return status.model_dump_json().encode()


def _report_fields(report: DeliveryReport | None) -> dict[str, Any] | None:
    if report is None:
        return None
    return {
        "delivered": report.delivered,
        "attempts": report.attempts,
        "outcome": report.last.outcome,
        "detail": report.last.detail,
        "status": report.last.status,
    }
