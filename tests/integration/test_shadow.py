"""Shadow deployments against the real stack: registration through the API, mirrored calls to
Triton, shadow records in the prediction log (and in Kafka), removal, and the admin checks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import test_gateway
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from fastapi import Request

from gateway.auth.credentials import ApiKey
from gateway.auth.guards import Authenticate
from gateway.auth.key_store import create_api_key
from gateway.auth.keys import ApiKeyAuthenticator
from gateway.catalog.dsn import dsn
from gateway.config import GatewaySettings
from gateway.http.app import create_app
from gateway.http.deps import GatewayDeps
from gateway.settings import Settings
from rtinfer.client import FraudClient
from rtinfer.stack import StackState

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(120)]

MODEL = "fraud_xgb"
SHADOW_ENDPOINT = "fraud_nn_pipeline"  # another demo ensemble, so answers differ from prod
VERSION = "shadow-it"  # every catalog row these tests create has a version starting so
MERCHANT = "m_00042"
CONTEXT = {"amount": 980.0, "hour_of_day": 3, "ip_risk_score": 0.7, "is_new_device": 1}


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


class RecordingLog(test_gateway.RecordingLog):
    def shadow(self, request_id: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["arm"] == "shadow" and r["request_id"] == request_id]


@dataclass
class Gateway:
    client: httpx.AsyncClient
    log: RecordingLog

    async def predict(self, body: Mapping[str, Any], **kw: Any) -> httpx.Response:
        return await self.client.post(f"/predict/{MODEL}", json=body, **kw)

    async def register(self, version: str = VERSION, **kw: Any) -> httpx.Response:
        body = {"model_version": version, "serving_endpoint": SHADOW_ENDPOINT, **kw}
        return await self.client.post(f"/models/{MODEL}/shadow", json=body)

    async def roles(self) -> dict[int, str]:
        r = await self.client.get(f"/models/{MODEL}")
        assert r.status_code == 200, r.text
        return {d["deployment_id"]: d["role"] for d in r.json()["deployments"]}


@pytest.fixture(scope="module")
def conninfo(running_stack: StackState, stack_settings: Settings) -> str:
    assert running_stack.postgres is not None
    return dsn(stack_settings.state_dir / "postgres", running_stack.postgres.port).conninfo


def sql(conninfo: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture()
def settings(running_stack: StackState, stack_settings: Settings, conninfo: str) -> Settings:
    gw = GatewaySettings(
        triton_grpc_url=running_stack.triton_ports.grpc_url,
        postgres_dsn=conninfo,
        auth="none",
        # a busy 2-core box must not turn answers into deadline fallbacks or shadow timeouts
        default_deadline_ms=5000,
        shadow_timeout_ms=5000,
        triton_ready_timeout_s=2.0,
    )
    return stack_settings.model_copy(update={"gateway": gw})


@pytest.fixture(autouse=True)
def no_leftover_shadows(conninfo: str) -> Iterator[None]:
    """Other tests share this catalog and expect the seeded one: remove what a test created."""
    yield
    sql(conninfo, "DELETE FROM model_deployments WHERE model_version LIKE %s", (f"{VERSION}%",))
    sql(
        conninfo,
        "DELETE FROM model_deployment_history WHERE detail->>'model_version' LIKE %s",
        (f"{VERSION}%",),
    )


@asynccontextmanager
async def serve(
    settings: Settings, authenticate: Authenticate | None = None
) -> AsyncIterator[Gateway]:
    log = RecordingLog()
    app = create_app(settings, GatewayDeps(prediction_log=log, authenticate=authenticate))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client,
    ):
        yield Gateway(client, log)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.01)


def body(i: int, request_id: str) -> dict[str, Any]:
    return {
        "entity_ids": {"user_id": f"u_{i:06d}", "merchant_id": MERCHANT},
        "context": CONTEXT,
        "request_id": request_id,
    }


def comparable(r: httpx.Response) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Everything of a response but what may differ between two calls: the latency."""
    out = {k: v for k, v in r.json().items() if k != "latency_ms"}
    headers = {k: v for k, v in r.headers.items() if k != "content-length"}
    return r.status_code, out, headers


def history(conninfo: str, deployment_id: int) -> list[tuple[str, dict[str, Any]]]:
    rows = sql(
        conninfo,
        "SELECT action, detail FROM model_deployment_history WHERE deployment_id = %s ORDER BY id",
        (deployment_id,),
    )
    return [(action, detail) for action, detail in rows]


async def test_shadow_mirrors_requests_without_changing_production_answers(
    settings: Settings, conninfo: str, clients: dict[str, FraudClient]
) -> None:
    bodies = [body(i, f"{VERSION}-req-{i}") for i in range(8)]
    async with serve(settings) as gw:
        baseline = [await gw.predict(b) for b in bodies]
        assert all(r.status_code == 200 for r in baseline), baseline[0].text

        r = await gw.register()
        assert r.status_code == 201, r.text
        shadow = r.json()
        assert {k: shadow[k] for k in ("model_version", "serving_endpoint", "role")} == {
            "model_version": VERSION,
            "serving_endpoint": SHADOW_ENDPOINT,
            "role": "shadow",
        }
        assert (shadow["is_shadow"], shadow["traffic_pct"], shadow["shadow_sample_pct"]) == (
            True,
            0.0,
            100.0,
        )
        assert shadow["feature_groups"] == ["user", "merchant", "context"]  # the prod arm's
        shadow_id = shadow["deployment_id"]
        roles = await gw.roles()  # at once: the answer waited for this gateway's catalog
        assert roles[shadow_id] == "shadow" and sorted(roles.values()) == ["prod", "shadow"]
        (prod_id,) = [d for d, role in roles.items() if role == "prod"]

        gw.log.records.clear()
        mirrored = [await gw.predict(b) for b in bodies]
        assert [comparable(r) for r in mirrored] == [comparable(r) for r in baseline]

        async def all_shadowed() -> bool:
            return all(gw.log.shadow(b["request_id"]) for b in bodies)

        await eventually(all_shadowed, timeout_s=10.0)
        for b, r in zip(bodies, mirrored, strict=True):
            served = r.json()
            (record,) = gw.log.shadow(b["request_id"])
            direct = clients["grpc"].predict_one(
                SHADOW_ENDPOINT, b["entity_ids"]["user_id"], MERCHANT, CONTEXT
            )
            assert record["prediction"] == pytest.approx(direct.prediction, abs=1e-6)
            assert record["features"] == pytest.approx(direct.features, abs=1e-6)
            assert (record["label"], record["error"]) == (direct.label, None)
            assert (record["deployment_id"], record["model_version"]) == (shadow_id, VERSION)
            assert (record["model_name"], record["serving_endpoint"]) == (MODEL, SHADOW_ENDPOINT)
            assert record["production"] == {
                "model_version": "1",
                "deployment_id": prod_id,
                "arm": "prod",
                "serving_endpoint": "fraud_xgb_pipeline",
                "prediction": served["prediction"],
                "label": served["label"],
                "confidence": served["confidence"],
                "degraded": False,
                "degraded_reason": None,
                "latency_ms": served["latency_ms"],
            }
            (prod_record,) = [
                x
                for x in gw.log.records
                if x["request_id"] == b["request_id"] and x["arm"] == "prod"
            ]
            assert record["timestamp"] == prod_record["timestamp"]
        assert served["prediction"] != pytest.approx(record["prediction"], abs=1e-6)

        metrics = (await gw.client.get("/metrics")).text
        assert (
            'rtinfer_gateway_shadow_requests_total{model="fraud_xgb",outcome="ok"} 8.0' in metrics
        )
        assert 'rtinfer_gateway_shadow_seconds_count{model="fraud_xgb",outcome="ok"} 8.0' in metrics

        r = await gw.client.delete(f"/models/{MODEL}/shadow")
        assert r.status_code == 200, r.text
        assert r.json()["model_name"] == MODEL
        assert [d["deployment_id"] for d in r.json()["removed"]] == [shadow_id]
        assert shadow_id not in await gw.roles()
        assert sql(
            conninfo,
            "SELECT is_active FROM model_deployments WHERE deployment_id = %s",
            (shadow_id,),
        ) == [(False,)]
        assert [action for action, _ in history(conninfo, shadow_id)] == [
            "shadow_registered",
            "shadow_removed",
        ]

        after = [body(i, f"{VERSION}-after-{i}") for i in range(4)]
        for b in after:
            assert (await gw.predict(b)).status_code == 200
        await asyncio.sleep(0.5)  # a mirrored call takes a few ms here
        assert not any(gw.log.shadow(b["request_id"]) for b in after)
        assert all(any(x["request_id"] == b["request_id"] for x in gw.log.records) for b in after)


async def test_failing_shadow_is_recorded_with_its_error_and_production_still_answers(
    settings: Settings, conninfo: str
) -> None:
    async with serve(settings) as gw:
        # registered earlier, its ensemble since unloaded: the API would refuse it now (422)
        (shadow_id,) = sql(
            conninfo,
            "INSERT INTO model_deployments (model_name, model_version, serving_endpoint, "
            "traffic_pct, is_shadow) VALUES (%s, %s, 'fraud_missing_pipeline', 0, true) "
            "RETURNING deployment_id",
            (MODEL, f"{VERSION}-gone"),
        )[0]

        async def seen() -> bool:
            return (await gw.roles()).get(shadow_id) == "shadow"

        await eventually(seen, timeout_s=2.0)  # NOTIFY
        r = await gw.predict(body(1, f"{VERSION}-fail"))
        assert r.status_code == 200, r.text
        assert r.json()["degraded"] is False and "X-Prediction-Degraded" not in r.headers

        async def recorded() -> bool:
            return bool(gw.log.shadow(f"{VERSION}-fail"))

        await eventually(recorded, timeout_s=10.0)
        (record,) = gw.log.shadow(f"{VERSION}-fail")
        assert record["error"]["code"] == "model_not_ready"
        assert "fraud_missing_pipeline" in record["error"]["message"]
        assert (record["prediction"], record["features"]) == (None, [])
        assert record["production"]["prediction"] == r.json()["prediction"]
        metrics = (await gw.client.get("/metrics")).text
        assert (
            'rtinfer_gateway_shadow_requests_total{model="fraud_xgb",outcome="error"} 1.0'
            in metrics
        )


async def test_shadow_endpoint_errors(settings: Settings, conninfo: str) -> None:
    async with serve(settings) as gw:

        async def error(r: httpx.Response, status: int, code: str) -> str:
            assert r.status_code == status, r.text
            assert r.json()["error"]["code"] == code, r.text
            return str(r.json()["error"]["message"])

        r = await gw.client.post(
            "/models/no_such_model/shadow",
            json={"model_version": VERSION, "serving_endpoint": SHADOW_ENDPOINT},
        )
        assert "no_such_model" in await error(r, 404, "model_not_found")
        r = await gw.client.delete("/models/no_such_model/shadow")
        assert "no_such_model" in await error(r, 404, "model_not_found")
        r = await gw.client.delete(f"/models/{MODEL}/shadow")
        assert "no active shadow" in await error(r, 404, "shadow_not_found")

        message = await error(
            await gw.register(serving_endpoint="fraud_missing_pipeline"), 422, "invalid_request"
        )
        assert message.startswith("serving_endpoint:") and "fraud_missing_pipeline" in message
        message = await error(await gw.register(sample_pct=150), 422, "invalid_request")
        assert message.startswith("sample_pct:")
        message = await error(
            await gw.client.post(
                f"/models/{MODEL}/shadow",
                content=b"{",
                headers={"content-type": "application/json"},
            ),
            422,
            "invalid_request",
        )
        assert "not valid JSON" in message

        first = await gw.register(sample_pct=50)
        assert first.status_code == 201, first.text
        message = await error(await gw.register(), 409, "shadow_exists")
        assert VERSION in message and "remove it first" in message
        assert sql(
            conninfo,
            "SELECT shadow_sample_pct FROM model_deployments "
            "WHERE model_name = %s AND is_active AND is_shadow",
            (MODEL,),
        ) == [(50,)]

        r = await gw.client.delete(f"/models/{MODEL}/shadow", params={"model_version": "other"})
        assert "'other'" in await error(r, 404, "shadow_not_found")
        r = await gw.client.delete(f"/models/{MODEL}/shadow", params={"model_version": "a b"})
        assert "model_version" in await error(r, 422, "invalid_request")
        r = await gw.client.delete(f"/models/{MODEL}/shadow", params={"model_version": VERSION})
        assert r.status_code == 200 and len(r.json()["removed"]) == 1, r.text


async def test_shadow_changes_need_an_admin_key(settings: Settings, conninfo: str) -> None:
    admin, admin_token = await asyncio.to_thread(create_api_key, conninfo, f"{VERSION}-ops", True)
    user, user_token = await asyncio.to_thread(create_api_key, conninfo, f"{VERSION}-app", False)
    try:
        async with ApiKeyAuthenticator(conninfo) as authenticator:

            async def authenticate(request: Request) -> ApiKey:
                return await authenticator.authenticate(request.headers)

            async with serve(settings, authenticate) as gw:
                as_admin = {"Authorization": f"Bearer {admin_token}"}
                as_user = {"Authorization": f"Bearer {user_token}"}
                shadow = {"model_version": VERSION, "serving_endpoint": SHADOW_ENDPOINT}
                url = f"/models/{MODEL}/shadow"

                r = await gw.client.post(url, json=shadow)
                assert (r.status_code, r.json()["error"]["code"]) == (401, "missing_api_key")
                for r in (
                    await gw.client.post(url, json=shadow, headers=as_user),
                    await gw.client.post(url, json={"bad": 1}, headers=as_user),
                    await gw.client.delete(url, headers=as_user),
                ):
                    assert r.status_code == 403, r.text
                    error = r.json()["error"]
                    assert error["code"] == "admin_required"
                    assert "admin API key" in error["message"] and user.key_id in error["message"]

                r = await gw.client.post(url, json=shadow, headers=as_admin)
                assert r.status_code == 201, r.text
                shadow_id = r.json()["deployment_id"]
                r = await gw.client.get(f"/models/{MODEL}", headers=as_user)  # reads stay open
                assert shadow_id in [d["deployment_id"] for d in r.json()["deployments"]]
                r = await gw.client.delete(url, headers=as_admin)
                assert r.status_code == 200, r.text
        assert [(a, d["actor"]) for a, d in history(conninfo, shadow_id)] == [
            ("shadow_registered", admin.key_id),
            ("shadow_removed", admin.key_id),
        ]
    finally:
        sql(conninfo, "DELETE FROM api_keys WHERE key_id IN (%s, %s)", (admin.key_id, user.key_id))


async def test_shadow_records_reach_the_predictions_shadow_topic(
    running_stack: StackState, settings: Settings, tmp_path: Path
) -> None:
    """With the default (Kafka) prediction log; shutdown waits for the shadow calls."""
    assert running_stack.kafka_bootstrap is not None
    settings.gateway.prediction_log = "kafka"
    settings.gateway.kafka_bootstrap = running_stack.kafka_bootstrap
    settings.gateway.spool_dir = tmp_path / "spool"
    ids = [f"{VERSION}-kafka-{uuid.uuid4().hex[:8]}-{i}" for i in range(5)]
    served: dict[str, dict[str, Any]] = {}
    app = create_app(settings)  # no injected log: the serving core opens one from the settings
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client,
    ):
        r = await client.post(
            f"/models/{MODEL}/shadow",
            json={"model_version": VERSION, "serving_endpoint": SHADOW_ENDPOINT},
        )
        assert r.status_code == 201, r.text
        shadow_id = r.json()["deployment_id"]
        for i, rid in enumerate(ids):
            r = await client.post(f"/predict/{MODEL}", json=body(i, rid))
            assert r.status_code == 200, r.text
            served[rid] = r.json()
        assert (await client.delete(f"/models/{MODEL}/shadow")).status_code == 200
    # lifespan exit: shadow calls finished, then the producer flushed

    found = consume(running_stack.kafka_bootstrap, "predictions-shadow", set(ids))
    assert set(found) == set(ids)
    for rid, (key, record) in found.items():
        assert key == rid.encode()
        assert (record["arm"], record["deployment_id"], record["error"]) == (
            "shadow",
            shadow_id,
            None,
        )
        assert record["schema_version"] == 1 and record["feature_hash"]
        assert record["production"]["prediction"] == served[rid]["prediction"]
        assert record["production"]["model_version"] == "1"


def consume(bootstrap: str, topic: str, ids: set[str]) -> dict[str, tuple[bytes, dict[str, Any]]]:
    """Key and value of each record of ``ids`` in ``topic``, read from the start."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-shadow-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    found: dict[str, tuple[bytes, dict[str, Any]]] = {}
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + 20
        while set(found) < ids and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            record = orjson.loads(msg.value())
            if record["request_id"] in ids:
                found[record["request_id"]] = (msg.key(), record)
    finally:
        consumer.close()
    return found
