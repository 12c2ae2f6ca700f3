"""One async job end to end with plain fakes: idempotent redelivery, retries, dead letters."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.asyncpred.backoff import Backoff
from gateway.asyncpred.callback_delivery import AttemptResult, DeliveryReport
from gateway.asyncpred.jobs import JobRunner
from gateway.asyncpred.metrics import AsyncWorkerMetrics
from gateway.asyncpred.results import ResultStoreError
from gateway.asyncpred.schemas import AsyncJob
from gateway.errors import ModelNotFound, UpstreamUnavailable
from gateway.schemas import PredictRequest, PredictResponse

RESPONSE = PredictResponse(
    prediction=0.91,
    label="fraud",
    confidence=0.91,
    model_name="fraud_xgb",
    model_version="1",
    deployment_arm="prod",
    degraded=False,
    request_id="req-1",
    latency_ms=1.5,
)


def job(callback_url: str | None = "https://hooks.example.com/cb") -> AsyncJob:
    return AsyncJob(
        job_id="a" * 32,
        token=f"v1.{'a' * 32}.1750000000.{'b' * 32}",
        model_name="fraud_xgb",
        request=PredictRequest.model_validate(
            {"entity_ids": {"user_id": "u_1", "merchant_id": "m_1"}, "request_id": "req-1"}
        ),
        callback_url=callback_url,
        submitted_at=time.time(),
    )


@dataclass
class FakeService:
    """Answers with the scripted outcomes in turn (an exception is raised)."""

    script: list[PredictResponse | Exception]
    calls: int = 0

    async def predict(self, model_name: str, request: PredictRequest, *, request_id: str) -> Any:
        self.calls += 1
        outcome = self.script[min(self.calls, len(self.script)) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


@dataclass
class FakeStore:
    results: dict[str, bytes] = field(default_factory=dict)
    settled: set[str] = field(default_factory=set)
    failures_left: int = 0

    def _maybe_fail(self) -> None:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise ResultStoreError("redis: ConnectionError: refused")

    async def get(self, job_id: str) -> bytes | None:
        self._maybe_fail()
        return self.results.get(job_id)

    async def put_if_absent(self, job_id: str, body: bytes) -> tuple[bytes, bool]:
        self._maybe_fail()
        if job_id in self.results:
            return self.results[job_id], False
        self.results[job_id] = body
        return body, True

    async def is_settled(self, job_id: str) -> bool:
        self._maybe_fail()
        return job_id in self.settled

    async def mark_settled(self, job_id: str) -> None:
        self._maybe_fail()
        self.settled.add(job_id)


@dataclass
class FakeCallbacks:
    delivered: bool = True
    sent: list[tuple[str, str, bytes]] = field(default_factory=list)

    async def deliver(self, url: str, delivery_id: str, body: bytes) -> DeliveryReport:
        self.sent.append((url, delivery_id, body))
        if self.delivered:
            return DeliveryReport(True, 1, AttemptResult("delivered", "HTTP 200", 200))
        return DeliveryReport(False, 5, AttemptResult("http_error", "HTTP 500", 500))


@dataclass
class FakeProducer:
    messages: list[tuple[str, bytes, dict[str, Any]]] = field(default_factory=list)

    async def send(
        self, topic: str, key: bytes, value: bytes, headers: dict[str, bytes] | None = None
    ) -> tuple[int, int]:
        self.messages.append((topic, key, json.loads(value)))
        return 0, len(self.messages) - 1


@dataclass
class Harness:
    service: FakeService
    store: FakeStore = field(default_factory=FakeStore)
    callbacks: FakeCallbacks = field(default_factory=FakeCallbacks)
    dlq: FakeProducer = field(default_factory=FakeProducer)
    sleeps: list[float] = field(default_factory=list)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.metrics = AsyncWorkerMetrics(self.registry)

    def runner(self, predict_attempts: int = 3) -> JobRunner:
        async def sleep(s: float) -> None:
            self.sleeps.append(s)

        return JobRunner(
            service=self.service,  # type: ignore[arg-type]
            store=self.store,  # type: ignore[arg-type]
            callbacks=self.callbacks,  # type: ignore[arg-type]
            dead_letters=self.dlq,  # type: ignore[arg-type]
            dlq_topic="dlq",
            metrics=self.metrics,
            predict_attempts=predict_attempts,
            backoff=Backoff(0.5, 4.0),
            sleep=sleep,
        )

    def run(self, j: AsyncJob, runner: JobRunner | None = None) -> str:
        value = j.model_dump_json().encode()
        return asyncio.run((runner or self.runner()).run(j.job_id.encode(), value))

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def stored(self, j: AsyncJob) -> dict[str, Any]:
        return json.loads(self.store.results[j.job_id])  # type: ignore[no-any-return]


def test_a_job_is_predicted_stored_called_back_and_settled() -> None:
    h = Harness(FakeService([RESPONSE]))
    j = job()
    assert h.run(j) == "done"
    stored = h.stored(j)
    assert stored["status"] == "done" and stored["token"] == j.token
    assert stored["result"] == RESPONSE.model_dump()
    assert h.callbacks.sent == [(j.callback_url, j.job_id, h.store.results[j.job_id])]
    assert j.job_id in h.store.settled and h.dlq.messages == []
    assert h.metric("rtinfer_async_jobs_completed_total", status="done") == 1


def test_a_settled_job_delivered_again_does_nothing() -> None:
    h = Harness(FakeService([RESPONSE]))
    j = job()
    h.run(j)
    assert h.run(j) == "already_settled"
    assert h.service.calls == 1 and len(h.callbacks.sent) == 1


def test_a_job_redelivered_after_its_result_was_stored_is_not_predicted_again() -> None:
    # a worker died after storing the result, before the callback
    h = Harness(FakeService([RESPONSE]))
    j = job()
    stored = b'{"token":"t","status":"done","model_name":"fraud_xgb","result":null}'
    h.store.results[j.job_id] = stored
    assert h.run(j) == "done"
    assert h.service.calls == 0
    assert h.callbacks.sent == [(j.callback_url, j.job_id, stored)]  # the stored bytes
    assert h.metric("rtinfer_async_jobs_redelivered_total") == 1
    assert h.metric("rtinfer_async_jobs_completed_total", status="done") == 0


def test_transient_prediction_failures_are_retried_with_backoff() -> None:
    down = UpstreamUnavailable("triton unreachable")
    h = Harness(FakeService([down, down, RESPONSE]))
    j = job(callback_url=None)
    assert h.run(j) == "done"
    assert h.service.calls == 3 and len(h.sleeps) == 2
    assert 0 <= h.sleeps[0] <= 0.5 and 0 <= h.sleeps[1] <= 1.0
    assert h.stored(j)["status"] == "done"
    assert h.metric("rtinfer_async_prediction_retries_total") == 2


def test_exhausted_retries_fail_the_job_and_dead_letter_it() -> None:
    h = Harness(FakeService([UpstreamUnavailable("triton unreachable")]))
    j = job()
    assert h.run(j) == "dead_lettered"
    assert h.service.calls == 3
    stored = h.stored(j)
    assert stored["status"] == "failed" and stored["result"] is None
    assert stored["error"] == {"code": "upstream_unavailable", "message": "triton unreachable"}
    assert json.loads(h.callbacks.sent[0][2])["status"] == "failed"  # the client is told
    [(topic, key, message)] = h.dlq.messages
    assert (topic, key, message["reason"]) == ("dlq", j.job_id.encode(), "prediction_failed")
    assert message["job"]["job_id"] == j.job_id and message["status"]["status"] == "failed"
    assert j.job_id in h.store.settled
    assert h.metric("rtinfer_async_dlq_total", reason="prediction_failed") == 1
    assert h.metric("rtinfer_async_jobs_completed_total", status="failed") == 1


def test_client_errors_fail_at_once() -> None:
    h = Harness(FakeService([ModelNotFound("unknown model 'fraud_xgb'"), RESPONSE]))
    j = job(callback_url=None)
    assert h.run(j) == "dead_lettered"
    assert h.service.calls == 1 and h.sleeps == []
    assert h.stored(j)["error"]["code"] == "model_not_found"


def test_an_undeliverable_callback_dead_letters_the_job() -> None:
    h = Harness(FakeService([RESPONSE]), callbacks=FakeCallbacks(delivered=False))
    j = job()
    assert h.run(j) == "dead_lettered"
    [(_, _, message)] = h.dlq.messages
    assert message["reason"] == "callback_failed"
    assert message["callback"] == {
        "delivered": False, "attempts": 5, "outcome": "http_error", "detail": "HTTP 500",
        "status": 500,
    }  # fmt: skip
    assert message["status"]["status"] == "done"  # the result itself is stored and pollable
    assert j.job_id in h.store.settled


def test_unreadable_messages_go_to_the_dead_letter_topic() -> None:
    h = Harness(FakeService([RESPONSE]))
    outcome = asyncio.run(h.runner().run(b"k", b'{"not": "a job"}'))
    assert outcome == "invalid"
    [(_, key, message)] = h.dlq.messages
    assert (key, message["reason"], message["raw"]) == (b"k", "invalid_message", '{"not": "a job"}')
    assert h.service.calls == 0


@pytest.mark.parametrize("failures", [1, 3])
def test_redis_outages_are_waited_out(failures: int) -> None:
    h = Harness(FakeService([RESPONSE]))
    h.store.failures_left = failures
    j = job(callback_url=None)
    assert h.run(j) == "done"
    assert h.service.calls == 1 and len(h.sleeps) == failures
    assert j.job_id in h.store.settled
