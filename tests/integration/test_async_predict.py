"""Async predictions against the real stack: gateway in-process, workers as real processes.

Each test module run uses topics and a consumer group of its own, so jobs of other runs on
the same broker are never picked up.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from callback_receiver import CallbackReceiver
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from pydantic import SecretStr

from gateway.asyncpred.callback_signature import verify_signature
from gateway.asyncpred.config import AsyncPredictSettings
from gateway.asyncpred.tokens import issue_token
from gateway.auth.credentials import parse_token
from gateway.auth.key_store import create_api_key
from gateway.catalog.dsn import dsn
from gateway.config import GatewaySettings
from gateway.http.app import create_app
from gateway.settings import Settings
from rtinfer.kafka_server import DAY_MS, TopicSpec, admin_client, ensure_topics
from rtinfer.procs import ManagedProcess, pid_alive
from rtinfer.stack import StackState
from rtinfer.worker_process import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(120)]

MODEL = "fraud_xgb"
BODY = {
    "entity_ids": {"user_id": "u_000314", "merchant_id": "m_00042"},
    "context": {"amount": 980.0, "hour_of_day": 3, "ip_risk_score": 0.7, "is_new_device": 1},
}
CALLBACK_SECRET = "integration-callback-secret-0123456789"
TOKEN_SECRET = "integration-token-secret-0123456789"
PARTITIONS = 3


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


@dataclass(frozen=True)
class AsyncSetup:
    settings: Settings
    bootstrap: str

    @property
    def config(self) -> AsyncPredictSettings:
        return self.settings.gateway.async_predict


def async_setup(
    stack_settings: Settings, stack: StackState, *, configured_secrets: bool = True
) -> AsyncSetup:
    """Settings with fresh topics and group; loopback callbacks allowed, quick retries."""
    assert stack.postgres is not None and stack.kafka_bootstrap is not None
    tag = uuid.uuid4().hex[:8]
    requests, dlq = f"async-requests-{tag}", f"async-dlq-{tag}"
    ensure_topics(
        stack.kafka_bootstrap,
        {requests: TopicSpec(PARTITIONS, DAY_MS), dlq: TopicSpec(1, DAY_MS)},
    )
    secrets: dict[str, Any] = {}
    if configured_secrets:
        secrets = {"callback_secret": CALLBACK_SECRET, "token_secret": TOKEN_SECRET}
    config = AsyncPredictSettings(
        requests_topic=requests,
        dlq_topic=dlq,
        consumer_group=f"async-test-{tag}",
        redis_url=stack.redis_url,
        allowed_callback_networks=["127.0.0.0/8"],
        callback_attempts=3,
        backoff_base_s=0.05,
        backoff_cap_s=0.2,
        callback_timeout_s=2.0,
        default_deadline_ms=5000,
        session_timeout_ms=6000,  # the broker's minimum: a killed worker is noticed quickly
        lag_refresh_s=0.5,
        shutdown_grace_s=2.0,
        **secrets,
    )
    gw = GatewaySettings(
        triton_grpc_url=stack.triton_ports.grpc_url,
        postgres_dsn=dsn(stack_settings.state_dir / "postgres", stack.postgres.port).conninfo,
        default_deadline_ms=5000,
        kafka_bootstrap=stack.kafka_bootstrap,
        prediction_log="discard",
        auth="none",
        async_predict=config,
    )
    return AsyncSetup(stack_settings.model_copy(update={"gateway": gw}), stack.kafka_bootstrap)


def drop_topics(setup: AsyncSetup) -> None:
    """Delete the setup's topics (other tests list the broker's topics)."""
    config = setup.config
    admin = admin_client(setup.bootstrap)  # keep it alive until the futures resolve
    futures = admin.delete_topics([config.requests_topic, config.dlq_topic], operation_timeout=30)
    for future in futures.values():
        future.result(timeout=30)


@pytest.fixture(scope="module")
def setup(running_stack: StackState, stack_settings: Settings) -> Iterator[AsyncSetup]:
    made = async_setup(stack_settings, running_stack)
    yield made
    drop_topics(made)


@pytest.fixture(scope="module")
def worker(setup: AsyncSetup, running_stack: StackState) -> Iterator[ManagedProcess]:
    proc, _ = start_worker(setup.settings, running_stack.triton_ports.grpc_url)
    yield proc
    proc.stop(timeout_s=15)


@pytest.fixture()
def receiver() -> Iterator[CallbackReceiver]:
    r = CallbackReceiver()
    yield r
    r.close()


@asynccontextmanager
async def gateway(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway") as client,
    ):
        yield client


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s}s")
        await asyncio.sleep(0.05)


async def submit(client: httpx.AsyncClient, callback_url: str | None, **kw: Any) -> str:
    body = {**BODY, **({"callback_url": callback_url} if callback_url else {})}
    r = await client.post(f"/predict/{MODEL}/async", json=body, **kw)
    assert r.status_code == 202, r.text
    return str(r.json()["token"])


def job_id(token: str) -> str:
    return token.split(".")[1]


def high_watermarks(bootstrap: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"wm-{uuid.uuid4().hex}"})
    try:
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
            for p in range(PARTITIONS)
        )
    finally:
        consumer.close()


def read_dead_letter(bootstrap: str, topic: str, key: str, timeout_s: float) -> dict[str, Any]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"dlq-{uuid.uuid4().hex}"})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None and msg.key() == key.encode():
                return json.loads(msg.value())  # type: ignore[no-any-return]
    finally:
        consumer.close()
    pytest.fail(f"no dead letter for {key} in {topic} within {timeout_s}s")


def metric(text: str, name: str) -> float:
    """Sum of every sample of ``name`` in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_accepted_job_is_called_back_signed_and_polls_the_same_result(
    setup: AsyncSetup, worker: ManagedProcess, receiver: CallbackReceiver
) -> None:
    async with gateway(setup.settings) as client:
        r = await client.post(
            f"/predict/{MODEL}/async",
            json={**BODY, "callback_url": receiver.url("/hook?source=test")},
            headers={"X-Request-ID": "async-req-1"},
        )
        assert r.status_code == 202, r.text
        accepted = r.json()
        token = accepted["token"]
        assert accepted["status"] == "pending" and accepted["request_id"] == "async-req-1"
        assert r.headers["location"] == accepted["poll_url"] == f"/predict/{MODEL}/async/{token}"
        first = (await client.get(accepted["poll_url"])).json()
        assert first["status"] in ("pending", "done") and first["token"] == token

        async def called_back() -> bool:
            return len(receiver.snapshot()) >= 1

        await eventually(called_back, 30, "callback")
        [callback] = receiver.snapshot()
        verify_signature(CALLBACK_SECRET, callback.headers["X-RTInfer-Signature"], callback.body)
        assert callback.path == "/hook?source=test"
        assert callback.headers["X-RTInfer-Delivery"] == job_id(token)
        assert callback.headers["X-RTInfer-Attempt"] == "1"
        payload = json.loads(callback.body)
        assert (payload["status"], payload["token"], payload["error"]) == ("done", token, None)
        assert payload["result"]["request_id"] == "async-req-1"

        polled = await client.get(accepted["poll_url"])
        assert polled.status_code == 200 and polled.content == callback.body  # same bytes
        sync = await client.post(f"/predict/{MODEL}", json=BODY)
        assert sync.status_code == 200, sync.text
        expected = sync.json()
        for key in ("prediction", "label", "confidence", "model_version", "degraded"):
            assert payload["result"][key] == pytest.approx(expected[key]), key


async def test_unknown_model_and_bad_callbacks_are_refused_before_queueing(
    setup: AsyncSetup, receiver: CallbackReceiver
) -> None:
    topic = setup.config.requests_topic
    before = await asyncio.to_thread(high_watermarks, setup.bootstrap, topic)
    async with gateway(setup.settings) as client:
        r = await client.post("/predict/no_such_model/async", json=BODY)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        for url, why in [
            ("http://10.1.2.3/hook", "private"),
            ("http://[::1]:9/hook", "loopback"),  # only 127.0.0.0/8 is allowed here
            ("http://169.254.169.254/latest/meta-data", "link-local"),
            ("ftp://example.com/hook", "scheme"),
            ("http://user:pw@example.com/hook", "user info"),
            ("http://no-such-host.invalid/hook", "does not resolve"),
        ]:
            r = await client.post(f"/predict/{MODEL}/async", json={**BODY, "callback_url": url})
            assert r.status_code == 422, (url, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_request", url
            assert error["message"].startswith("callback_url"), error
            assert why in error["message"], error
        r = await client.post(f"/predict/{MODEL}/async", json={"entity_ids": {}})
        assert r.status_code == 422 and "entity_ids.user_id" in r.json()["error"]["message"]

        # tokens: a valid one never queued reads pending, anything else is not found
        key = TOKEN_SECRET.encode()
        never_queued = issue_token(key, MODEL).text
        r = await client.get(f"/predict/{MODEL}/async/{never_queued}")
        assert r.status_code == 200 and r.json()["status"] == "pending"
        version, job, issued, owner, mac = never_queued.split(".")
        for token, model in [
            (never_queued, "fraud_nn"),  # issued for another model
            (f"{version}.{job}.{issued}.{owner}.{'0' * len(mac)}", MODEL),  # forged
            ("garbled", MODEL),
            (issue_token(key, MODEL, now=time.time() - 200_000).text, MODEL),  # past the TTL
        ]:
            r = await client.get(f"/predict/{model}/async/{token}")
            assert r.status_code == 404, token
            assert r.json()["error"]["code"] == "job_not_found", token
    after = await asyncio.to_thread(high_watermarks, setup.bootstrap, topic)
    assert after == before  # nothing was queued
    assert receiver.snapshot() == []


async def test_a_failing_receiver_gets_n_attempts_then_the_job_is_dead_lettered(
    setup: AsyncSetup, worker: ManagedProcess
) -> None:
    receiver = CallbackReceiver(status=500)
    try:
        async with gateway(setup.settings) as client:
            token = await submit(client, receiver.url())
            letter = await asyncio.to_thread(
                read_dead_letter, setup.bootstrap, setup.config.dlq_topic, job_id(token), 30.0
            )
            assert letter["reason"] == "callback_failed"
            assert letter["job"]["token"] == token
            assert letter["callback"]["attempts"] == setup.config.callback_attempts == 3
            assert letter["callback"]["status"] == 500
            attempts = receiver.snapshot()
            assert [a.headers["X-RTInfer-Attempt"] for a in attempts] == ["1", "2", "3"]
            assert {a.headers["X-RTInfer-Delivery"] for a in attempts} == {job_id(token)}
            polled = (await client.get(f"/predict/{MODEL}/async/{token}")).json()
            assert polled["status"] == "done"  # the result is kept; only the callback failed
    finally:
        receiver.close()


async def test_a_worker_killed_mid_job_loses_nothing(
    running_stack: StackState, stack_settings: Settings, receiver: CallbackReceiver
) -> None:
    """SIGKILL while every job waits on its callback: results stored, nothing committed.

    A new worker takes the partitions over, finds every result stored (predicts nothing
    again) and delivers the callbacks again: at least once, deduplicated by delivery id.
    """
    setup = async_setup(stack_settings, running_stack, configured_secrets=False)
    grpc = running_stack.triton_ports.grpc_url
    receiver.hold.set()  # callbacks hang: the worker is mid-job when it dies
    first, _ = await asyncio.to_thread(start_worker, setup.settings, grpc, 0)
    second: ManagedProcess | None = None
    try:
        async with gateway(setup.settings) as client:
            tokens = [await submit(client, receiver.url()) for _ in range(8)]

            async def all_calling_back() -> bool:
                return {r.headers["X-RTInfer-Delivery"] for r in receiver.snapshot()} == {
                    job_id(t) for t in tokens
                }

            await eventually(all_calling_back, 30, "first worker reaching every callback")
            first.kill()
            killed_at = time.time()
            receiver.release()
            second, port = await asyncio.to_thread(start_worker, setup.settings, grpc, 1)

            async def all_done() -> bool:
                for token in tokens:
                    r = await client.get(f"/predict/{MODEL}/async/{token}")
                    if r.json()["status"] != "done":
                        return False
                return True

            await eventually(all_done, 60, "every job done")

            async def called_back_again() -> bool:
                again = {
                    r.headers["X-RTInfer-Delivery"] for r in receiver.snapshot() if r.at > killed_at
                }
                return again == {job_id(t) for t in tokens}

            await eventually(called_back_again, 30, "callbacks from the second worker")
        secret = (setup.settings.state_dir / "async-predict" / "callback-secret").read_text()
        for received in receiver.snapshot():
            verify_signature(secret.strip(), received.headers["X-RTInfer-Signature"], received.body)

        async def lag_zero() -> bool:
            async with httpx.AsyncClient() as http:
                text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            return (
                metric(text, "rtinfer_async_queue_lag") == 0 and "rtinfer_async_queue_lag{" in text
            )

        await eventually(lag_zero, 20, "offsets committed (queue lag 0)")
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        assert metric(text, "rtinfer_async_jobs_redelivered_total") == len(tokens)
        assert metric(text, "rtinfer_async_jobs_completed_total") == 0  # none predicted again
    finally:
        first.kill()
        if second is not None:
            second.stop(timeout_s=15)
        drop_topics(setup)


async def test_stack_up_runs_a_worker_on_the_default_topic(
    running_stack: StackState, stack_settings: Settings
) -> None:
    """The worker ``stack up`` started serves jobs of ``inference-requests`` (no callback)."""
    [worker] = running_stack.async_workers
    assert pid_alive(worker.pid)
    assert running_stack.postgres is not None
    gw = GatewaySettings(
        triton_grpc_url=running_stack.triton_ports.grpc_url,
        postgres_dsn=dsn(
            stack_settings.state_dir / "postgres", running_stack.postgres.port
        ).conninfo,
        kafka_bootstrap=running_stack.kafka_bootstrap,
        prediction_log="discard",
        auth="none",
        # default topics and group; the token secret generated in the stack's state dir
        async_predict=AsyncPredictSettings(redis_url=running_stack.redis_url),
    )
    async with gateway(stack_settings.model_copy(update={"gateway": gw})) as client:
        token = await submit(client, None)

        async def done() -> bool:
            r = await client.get(f"/predict/{MODEL}/async/{token}")
            return bool(r.json()["status"] == "done")

        await eventually(done, 30, "job served by the stack's worker")
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{worker.port}/metrics")).text
    assert metric(text, "rtinfer_async_jobs_completed_total") >= 1


async def test_a_result_is_read_only_with_the_submitting_key_or_an_admin_key(
    setup: AsyncSetup, worker: ManagedProcess, running_stack: StackState
) -> None:
    assert running_stack.postgres is not None
    conninfo = setup.settings.gateway.postgres_dsn.get_secret_value()  # type: ignore[union-attr]
    tokens = {
        name: create_api_key(conninfo, f"async-{name}-{uuid.uuid4().hex[:6]}", is_admin=admin)[1]
        for name, admin in (("a", False), ("b", False), ("ops", True))
    }
    gw = setup.settings.gateway.model_copy(
        update={"auth": "api_key", "redis_url": SecretStr(running_stack.redis_url)}
    )
    settings = setup.settings.model_copy(update={"gateway": gw})

    def as_key(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[name]}"}

    async with gateway(settings) as client:
        token = await submit(client, None, headers=as_key("a"))
        assert token.split(".")[3] == parse_token(tokens["a"])[0]  # bound to key a

        async def done() -> bool:
            r = await client.get(f"/predict/{MODEL}/async/{token}", headers=as_key("a"))
            return r.status_code == 200 and r.json()["status"] == "done"

        await eventually(done, 30, "the job's result")
        mine = await client.get(f"/predict/{MODEL}/async/{token}", headers=as_key("a"))
        other = await client.get(f"/predict/{MODEL}/async/{token}", headers=as_key("b"))
        admin = await client.get(f"/predict/{MODEL}/async/{token}", headers=as_key("ops"))
        unknown = await client.get(f"/predict/{MODEL}/async/garbled", headers=as_key("b"))
    assert other.status_code == 404 and other.json() == unknown.json()  # as for no such job
    assert other.json()["error"]["code"] == "job_not_found"
    assert admin.status_code == 200 and admin.content == mine.content
