"""The HTTP gateway against the real stack: Triton over gRPC, the Postgres catalog, NOTIFY."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from fastapi import Request
from psycopg.types.json import Jsonb

from gateway.auth.guards import Authenticate
from gateway.catalog.dsn import dsn
from gateway.config import GatewaySettings
from gateway.errors import RateLimited, Unauthorized
from gateway.http.app import create_app
from gateway.http.deps import GatewayDeps
from gateway.settings import Settings
from rtinfer.client import FraudClient
from rtinfer.procs import free_port, wait_until
from rtinfer.stack import StackState
from rtinfer.supervisor import Supervisor

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(120)]

SEEDED = {
    "fraud_xgb": "fraud_xgb_pipeline",
    "fraud_nn": "fraud_nn_pipeline",
    "fraud_blend": "fraud_blend_pipeline",
}
USER, MERCHANT = "u_000314", "m_00042"
CONTEXT = {"amount": 980.0, "hour_of_day": 3, "ip_risk_score": 0.7, "is_new_device": 1}
BODY = {"entity_ids": {"user_id": USER, "merchant_id": MERCHANT}, "context": CONTEXT}
CLASS_PRIOR = {"type": "class_prior", "score": 0.035, "threshold": 0.5}


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class RecordingLog:
    """Prediction-log sink keeping what the gateway hands it."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def log(self, record: Mapping[str, Any]) -> None:
        self.records.append(dict(record))


@dataclass
class Gateway:
    client: httpx.AsyncClient
    log: RecordingLog

    async def predict(self, model: str, body: Mapping[str, Any], **kw: Any) -> httpx.Response:
        return await self.client.post(f"/predict/{model}", json=body, **kw)


@pytest.fixture(scope="module")
def conninfo(running_stack: StackState, stack_settings: Settings) -> str:
    assert running_stack.postgres is not None
    return dsn(stack_settings.state_dir / "postgres", running_stack.postgres.port).conninfo


def gateway_settings(base: Settings, triton_grpc_url: str, conninfo: str) -> Settings:
    gw = GatewaySettings(
        triton_grpc_url=triton_grpc_url,
        postgres_dsn=conninfo,
        # a busy 2-core box must not turn Triton answers into deadline fallbacks
        default_deadline_ms=5000,
        triton_ready_timeout_s=1.0,
        auth="none",  # tests that need keys pass an authenticate hook or use test_gateway_auth
    )
    return base.model_copy(update={"gateway": gw})


@asynccontextmanager
async def serve(
    settings: Settings, authenticate: Authenticate | None = None
) -> AsyncIterator[Gateway]:
    log = RecordingLog()
    app = create_app(settings, GatewayDeps(prediction_log=log, authenticate=authenticate))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway") as client,
    ):
        yield Gateway(client, log)


@pytest.fixture()
async def gateway(
    running_stack: StackState,
    stack_settings: Settings,
    conninfo: str,
    live_settings: Settings,
) -> AsyncIterator[Gateway]:
    settings = gateway_settings(live_settings, running_stack.triton_ports.grpc_url, conninfo)
    async with serve(settings) as gw:
        yield gw


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float) -> float:
    """Seconds until ``check()`` holds; fails after ``timeout_s``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def deployments(gw: Gateway, model: str) -> list[dict[str, Any]]:
    r = await gw.client.get(f"/models/{model}")
    assert r.status_code == 200, r.text
    return list(r.json()["deployments"])


def sql(conninfo: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def set_traffic(conninfo: str, model: str, pct: float, version: str = "1") -> None:
    sql(
        conninfo,
        "UPDATE model_deployments SET traffic_pct = %s "
        "WHERE model_name = %s AND model_version = %s AND is_active AND NOT is_shadow",
        (pct, model, version),
    )


async def test_prediction_equals_triton_direct_with_headers_and_log_record(
    gateway: Gateway, clients: dict[str, FraudClient]
) -> None:
    for model, endpoint in SEEDED.items():
        r = await gateway.predict(model, BODY, headers={"X-Request-ID": f"req-{model}"})
        assert r.status_code == 200, r.text
        direct = clients["grpc"].predict_one(endpoint, USER, MERCHANT, CONTEXT)
        out = r.json()
        assert out["prediction"] == pytest.approx(direct.prediction, abs=1e-6)
        assert out["confidence"] == pytest.approx(direct.confidence, abs=1e-6)
        assert (out["label"], out["degraded"], out["degraded_reason"]) == (
            direct.label,
            False,
            None,
        )
        assert (out["model_name"], out["model_version"], out["deployment_arm"]) == (
            model,
            "1",
            "prod",
        )
        assert out["request_id"] == r.headers["X-Request-ID"] == f"req-{model}"
        assert "X-Prediction-Degraded" not in r.headers
        assert out["latency_ms"] > 0

        request_id = out["request_id"]
        await eventually(lambda rid=request_id: _logged(gateway, rid), timeout_s=1.0)
        record = next(x for x in gateway.log.records if x["request_id"] == request_id)
        assert record["features"] == pytest.approx(direct.features, abs=1e-6)
        assert len(record["features"]) == 50
        assert record["serving_endpoint"] == endpoint and record["arm"] == "prod"
        assert record["entity_ids"] == {"user_id": USER, "merchant_id": MERCHANT}
        assert record["context"] == CONTEXT
        assert record["prediction"] == out["prediction"]
        assert set(record["stage_latency_ms"]) == {"route", "infer"}
        assert abs(record["timestamp"] - time.time()) < 60

    # no header: a generated id; an id in the body wins over the header
    r = await gateway.predict("fraud_xgb", BODY)
    assert (
        len(r.headers["X-Request-ID"]) == 32 and r.json()["request_id"] == r.headers["X-Request-ID"]
    )
    r = await gateway.predict(
        "fraud_xgb", {**BODY, "request_id": "from-body"}, headers={"X-Request-ID": "from-header"}
    )
    assert r.headers["X-Request-ID"] == "from-body"


async def test_fast_path_and_route_answer_alike(gateway: Gateway) -> None:
    """``application/json`` takes the fast path (gateway/http/fast_predict.py); another JSON
    media type is served by the route itself: same body, same headers."""
    answers = []
    for i, media_type in enumerate(("application/json", "application/vnd.rtinfer+json")):
        r = await gateway.client.post(
            "/predict/fraud_xgb",
            content=orjson.dumps({**BODY, "request_id": f"alike-{i}"}),
            headers={"content-type": media_type},
        )
        assert r.status_code == 200, r.text
        out = r.json()
        assert out.pop("request_id") == r.headers["X-Request-ID"] == f"alike-{i}"
        out.pop("latency_ms")
        answers.append((out, r.headers["content-type"], "x-prediction-degraded" in r.headers))
    assert answers[0] == answers[1]


async def _logged(gw: Gateway, request_id: str) -> bool:
    return any(x["request_id"] == request_id for x in gw.log.records)


async def test_feature_overrides_replace_context_values(
    gateway: Gateway, clients: dict[str, FraudClient]
) -> None:
    body = {**BODY, "context": {**CONTEXT, "amount": 5.0}, "feature_overrides": {"amount": 4200.0}}
    r = await gateway.predict("fraud_xgb", body)
    assert r.status_code == 200, r.text
    direct = clients["grpc"].predict_one(
        "fraud_xgb_pipeline", USER, MERCHANT, {**CONTEXT, "amount": 4200.0}
    )
    assert r.json()["prediction"] == pytest.approx(direct.prediction, abs=1e-6)


async def test_unknown_model_is_404(gateway: Gateway) -> None:
    for r in (
        await gateway.predict("no_such_model", BODY),
        await gateway.client.get("/models/no_such_model"),
        await gateway.client.get("/predict/no_such_model/health"),
    ):
        assert r.status_code == 404, r.text
        assert r.json() == {
            "error": {"code": "model_not_found", "message": "unknown model 'no_such_model'"}
        }


BAD_BODIES: dict[str, tuple[bytes, str]] = {
    "malformed JSON": (b'{"entity_ids": {"user_id": "u"', "not valid JSON"),
    "not UTF-8": (b'{"entity_ids": "\xff\xfe"}', "not valid JSON"),
    "4301-digit integer": (
        b'{"entity_ids": {"user_id": "u", "merchant_id": "m"}, "context": {"amount": 1'
        + b"0" * 4300
        + b"}}",
        "not valid JSON",
    ),
    "NaN": (
        b'{"entity_ids": {"user_id": "u", "merchant_id": "m"}, "context": {"amount": NaN}}',
        "context.amount: Input should be a finite number",
    ),
    "wrong type": (
        b'{"entity_ids": {"user_id": 7, "merchant_id": "m"}}',
        "entity_ids.user_id: Input should be a valid string",
    ),
    "missing field": (
        b'{"entity_ids": {"user_id": "u"}}',
        "entity_ids.merchant_id: Field required",
    ),
    "unknown field": (
        b'{"entity_ids": {"user_id": "u", "merchant_id": "m"}, "ctx": {}}',
        "ctx: Extra inputs are not permitted",
    ),
    "unknown context feature": (
        b'{"entity_ids": {"user_id": "u", "merchant_id": "m"}, "context": {"amt": 1}}',
        "context.amt",
    ),
    "override of a store feature": (
        b'{"entity_ids": {"user_id": "u", "merchant_id": "m"}, '
        b'"feature_overrides": {"user_txn_count_24h": 1}}',
        "feature_overrides: only context features",
    ),
    "deadline out of range": (
        b'{"entity_ids": {"user_id": "u", "merchant_id": "m"}, "deadline_ms": 0}',
        "deadline_ms",
    ),
    "empty body": (b"", "body: Field required"),
    "array body": (b"[]", "body: Input should be a valid dictionary"),
}


async def test_client_mistakes_are_422_naming_the_field(gateway: Gateway) -> None:
    for case, (raw, expected) in BAD_BODIES.items():
        r = await gateway.client.post(
            "/predict/fraud_xgb", content=raw, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 422, (case, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_request", case
        assert expected in error["message"], (case, error["message"])
    r = await gateway.client.post(
        "/predict/fraud_xgb", content=b"user_id=u", headers={"Content-Type": "text/plain"}
    )
    assert r.status_code == 422, r.text


async def test_oversized_body_is_413(gateway: Gateway) -> None:
    padding = "x" * (64 * 1024)
    r = await gateway.predict("fraud_xgb", {**BODY, "request_id": padding})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"entity_ids": {"user_id": "u", "merchant_id": "m"}, "request_id": "'
        for _ in range(70):
            yield b"x" * 1024
        yield b'"}'

    r = await gateway.client.post(
        "/predict/fraud_xgb", content=chunked(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"


async def test_catalog_update_reaches_the_gateway_through_notify_within_1s(
    gateway: Gateway, conninfo: str
) -> None:
    assert [d["traffic_pct"] for d in await deployments(gateway, "fraud_nn")] == [100.0]
    try:
        set_traffic(conninfo, "fraud_nn", 60.0)

        async def seen() -> bool:
            return [d["traffic_pct"] for d in await deployments(gateway, "fraud_nn")] == [60.0]

        # the periodic full reload is every 30 s: only NOTIFY can be this fast
        assert await eventually(seen, timeout_s=1.0) < 1.0
    finally:
        set_traffic(conninfo, "fraud_nn", 100.0)


@pytest.fixture()
def xgb_canary(conninfo: str) -> Iterator[int]:
    """fraud_xgb split 70/30 with a canary served by another ensemble (fraud_nn_pipeline)."""
    (dep_id,) = sql(
        conninfo,
        "INSERT INTO model_deployments "
        "(model_name, model_version, serving_endpoint, traffic_pct, fallback_config) "
        "VALUES ('fraud_xgb', 'canary-test', 'fraud_nn_pipeline', 30, %s) "
        "RETURNING deployment_id",
        (Jsonb(CLASS_PRIOR),),
    )[0]
    set_traffic(conninfo, "fraud_xgb", 70.0)
    try:
        yield int(dep_id)
    finally:
        sql(conninfo, "DELETE FROM model_deployments WHERE deployment_id = %s", (dep_id,))
        set_traffic(conninfo, "fraud_xgb", 100.0)


async def test_canary_insert_is_seen_and_traffic_splits_stickily(
    gateway: Gateway, xgb_canary: int, clients: dict[str, FraudClient]
) -> None:
    async def split_seen() -> bool:
        deps = {d["deployment_id"]: d for d in await deployments(gateway, "fraud_xgb")}
        return xgb_canary in deps and sorted(d["traffic_pct"] for d in deps.values()) == [30, 70]

    await eventually(split_seen, timeout_s=1.0)

    users = [f"u_{i:06d}" for i in range(400)]
    arms = await _arms(gateway, users)
    canary_users = [u for u, (arm, _) in arms.items() if arm == "canary"]
    share = 100.0 * len(canary_users) / len(users)
    assert share == pytest.approx(30.0, abs=8.0), share  # binomial sd at n=400: 2.3 points
    assert {version for arm, version in arms.values() if arm == "canary"} == {"canary-test"}
    assert {version for arm, version in arms.values() if arm == "prod"} == {"1"}

    again = await _arms(gateway, users[:100])
    assert again == {u: arms[u] for u in users[:100]}  # sticky

    # the canary arm is really served by its own ensemble
    user = canary_users[0]
    r = await gateway.predict(
        "fraud_xgb", {**BODY, "entity_ids": {**BODY["entity_ids"], "user_id": user}}
    )
    direct = clients["grpc"].predict_one("fraud_nn_pipeline", user, MERCHANT, CONTEXT)
    assert r.json()["prediction"] == pytest.approx(direct.prediction, abs=1e-6)


async def _arms(gw: Gateway, users: list[str]) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for start in range(0, len(users), 16):
        batch = users[start : start + 16]
        responses = await asyncio.gather(
            *(
                gw.predict("fraud_xgb", {"entity_ids": {"user_id": u, "merchant_id": MERCHANT}})
                for u in batch
            )
        )
        for user, r in zip(batch, responses, strict=True):
            assert r.status_code == 200, r.text
            out[user] = (r.json()["deployment_arm"], r.json()["model_version"])
    return out


async def test_triton_unreachable_serves_the_class_prior_not_5xx(
    stack_settings: Settings,
    conninfo: str,
    live_settings: Settings,
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    async with serve(gateway_settings(live_settings, closed, conninfo)) as gw:
        r = await gw.predict("fraud_xgb", BODY)
        assert r.status_code == 200, r.text
        assert r.headers["X-Prediction-Degraded"] == "true"
        out = r.json()
        assert out["degraded"] is True
        assert out["degraded_reason"] == "triton_unavailable:class_prior"
        # the prior of the version's training statistics (aligned by the stack's deployer)
        (deployment,) = (await gw.client.get("/models/fraud_xgb")).json()["deployments"]
        prior = deployment["fallback"]["score"]
        assert prior != 0.035 and 0.0 < prior < 0.1
        assert (out["prediction"], out["label"]) == (prior, "legit")
        assert out["confidence"] == pytest.approx(1.0 - prior)
        again = (await gw.predict("fraud_xgb", BODY)).json()  # refused at once now, same reason
        assert again["degraded_reason"] == "triton_unavailable:class_prior"
        await eventually(lambda: _logged(gw, out["request_id"]), timeout_s=1.0)
        assert gw.log.records[-1]["features"] == []

        ready = await gw.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False
        assert ready.json()["catalog"] == "loaded (3 models)"
        assert closed in ready.json()["triton"]

        health = (await gw.client.get("/predict/fraud_xgb/health")).json()
        assert (health["status"], health["triton_reachable"]) == ("down", False)
        assert health["reasons"][0].startswith("triton unreachable")
        assert health["degraded_rate_1m"] == 1.0

        metrics = (await gw.client.get("/metrics")).text
        assert (
            'rtinfer_gateway_degraded_predictions_total{model="fraud_xgb",'
            'reason="triton_unavailable:class_prior"} 2.0' in metrics
        )

        # without a fallback the typed error comes through
        (original,) = sql(
            conninfo,
            "SELECT fallback_config FROM model_deployments "
            "WHERE model_name = 'fraud_nn' AND is_active AND NOT is_shadow",
        )[0]
        try:
            sql(
                conninfo,
                "UPDATE model_deployments SET fallback_config = '{}' "
                "WHERE model_name = 'fraud_nn' AND is_active AND NOT is_shadow",
            )

            async def no_fallback() -> bool:
                return (await deployments(gw, "fraud_nn"))[0]["fallback"] is None

            await eventually(no_fallback, timeout_s=1.0)
            r = await gw.predict("fraud_nn", BODY)
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "upstream_unavailable" and closed in error["message"]
            assert "X-Prediction-Degraded" not in r.headers
        finally:
            sql(
                conninfo,
                "UPDATE model_deployments SET fallback_config = %s "
                "WHERE model_name = 'fraud_nn' AND is_active AND NOT is_shadow",
                (Jsonb(original),),
            )


@pytest.fixture()
def blend_on_missing_ensemble(conninfo: str) -> Iterator[int]:
    """All fraud_blend traffic on a deployment whose ensemble Triton does not have."""
    (dep_id,) = sql(
        conninfo,
        "INSERT INTO model_deployments "
        "(model_name, model_version, serving_endpoint, traffic_pct, fallback_config) "
        "VALUES ('fraud_blend', 'ghost', 'fraud_missing_pipeline', 100, %s) "
        "RETURNING deployment_id",
        (Jsonb(CLASS_PRIOR),),
    )[0]
    set_traffic(conninfo, "fraud_blend", 0.0)
    try:
        yield int(dep_id)
    finally:
        sql(conninfo, "DELETE FROM model_deployments WHERE deployment_id = %s", (dep_id,))
        set_traffic(conninfo, "fraud_blend", 100.0)


async def test_model_not_ready_in_triton_serves_the_fallback(
    gateway: Gateway, blend_on_missing_ensemble: int
) -> None:
    async def routed() -> bool:
        roles = {d["deployment_id"]: d["role"] for d in await deployments(gateway, "fraud_blend")}
        return roles.get(blend_on_missing_ensemble) == "prod"

    await eventually(routed, timeout_s=1.0)
    r = await gateway.predict("fraud_blend", BODY)
    assert r.status_code == 200, r.text
    assert r.headers["X-Prediction-Degraded"] == "true"
    assert (r.json()["model_version"], r.json()["degraded_reason"]) == (
        "ghost",
        "model_not_ready:class_prior",
    )
    health = (await gateway.client.get("/predict/fraud_blend/health")).json()
    assert health["status"] == "down" and health["triton_reachable"] is True
    assert health["reasons"] == ["no traffic arm is READY in Triton"]
    roles = {d["serving_endpoint"]: (d["role"], d["ready"]) for d in health["deployments"]}
    assert roles == {
        "fraud_missing_pipeline": ("prod", False),
        "fraud_blend_pipeline": ("idle", True),
    }


async def test_metrics_health_and_readiness(gateway: Gateway) -> None:
    for _ in range(3):
        assert (await gateway.predict("fraud_xgb", BODY)).status_code == 200
    assert (await gateway.predict("no_such_model", BODY)).status_code == 404

    metrics = (await gateway.client.get("/metrics")).text
    assert (
        'rtinfer_gateway_requests_total{arm="prod",model="fraud_xgb",status="200"} 3.0' in metrics
    )
    assert 'rtinfer_gateway_requests_total{arm="none",model="unknown",status="404"} 1.0' in metrics
    assert 'rtinfer_gateway_errors_total{code="model_not_found"} 1.0' in metrics
    assert 'rtinfer_gateway_stage_seconds_count{stage="infer"} 3.0' in metrics
    # 3 predictions + the start-up warm-up call
    assert (
        'rtinfer_gateway_triton_seconds_count{endpoint="fraud_xgb_pipeline",outcome="ok"} 4.0'
        in metrics
    )

    health = (await gateway.client.get("/predict/fraud_xgb/health")).json()
    assert health["status"] == "ok" and health["triton_reachable"] is True
    (dep,) = health["deployments"]
    assert (dep["serving_endpoint"], dep["role"], dep["ready"]) == (
        "fraud_xgb_pipeline",
        "prod",
        True,
    )
    assert (dep["loaded_versions"], dep["state"]) == (["1"], "READY")
    assert dep["scorer_versions"] == {"fraud_xgb": "1"}  # the version that answers
    assert dep["probe"]["ok"] and not dep["probe"]["degraded"] and not dep["failing_fast"]
    assert health["requests_1m"] == 3 and health["degraded_rate_1m"] == 0.0
    store = health["feature_store"]
    assert (store["status"], store["degraded_rate_1m"]) == ("ok", 0.0)
    assert store["latency_ms"] > 0  # a real PING
    assert health["last_inference_latency_ms"] > 0
    assert health["gateway_workers"] == 1

    ready = await gateway.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert (await gateway.client.get("/livez")).status_code == 200


async def test_authenticate_hook_guards_prediction_and_catalog_routes(
    running_stack: StackState,
    stack_settings: Settings,
    conninfo: str,
    live_settings: Settings,
) -> None:
    async def authenticate(request: Request) -> None:
        key = request.headers.get("X-API-Key")
        if key == "slow-down":
            raise RateLimited("too many requests", retry_after_s=1.5)
        if key != "good":
            raise Unauthorized("missing or unknown API key")

    settings = gateway_settings(live_settings, running_stack.triton_ports.grpc_url, conninfo)
    async with serve(settings, authenticate) as gw:
        for r in (
            await gw.client.post("/predict/fraud_xgb", json={"entity_ids": 1}),
            await gw.client.get("/models"),
            await gw.client.get("/predict/fraud_xgb/health"),
        ):
            assert r.status_code == 401, r.text  # before the body is validated
            assert r.json()["error"]["code"] == "unauthorized"
        r = await gw.predict("fraud_xgb", BODY, headers={"X-API-Key": "slow-down"})
        assert (r.status_code, r.headers["Retry-After"]) == (429, "2")
        assert (
            await gw.predict("fraud_xgb", BODY, headers={"X-API-Key": "good"})
        ).status_code == 200
        assert (await gw.client.get("/readyz")).status_code == 200  # probes stay open
        metrics = (await gw.client.get("/metrics")).text
        assert 'rtinfer_gateway_stage_seconds_count{stage="auth"} 5.0' in metrics


async def test_openapi_documents_the_models_and_error_shape(gateway: Gateway) -> None:
    spec = (await gateway.client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    assert {"PredictRequest", "PredictResponse", "ErrorResponse", "ModelInfo"} <= set(schemas)
    responses = spec["paths"]["/predict/{model_name}"]["post"]["responses"]
    ok = responses["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/PredictResponse")
    for status in ("404", "413", "422", "503", "504"):
        ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse"), status


async def test_postgres_outage_keeps_the_last_catalog_then_listens_again(
    gateway: Gateway, running_stack: StackState, stack_settings: Settings, conninfo: str
) -> None:
    pg = running_stack.postgres
    assert pg is not None
    supervisor = Supervisor(stack_settings.state_dir)
    supervisor.stop("postgres")  # its fast shutdown; a clean stop stays down
    try:
        r = await gateway.predict("fraud_blend", BODY)
        assert r.status_code == 200 and r.json()["degraded"] is False, r.text
        assert len((await gateway.client.get("/models")).json()["models"]) == 3
        assert (await gateway.client.get("/readyz")).status_code == 200
    finally:
        supervisor.start_program("postgres")
        wait_until(
            lambda: psycopg.pq.PGconn.ping(conninfo.encode()) == psycopg.pq.Ping.OK,
            timeout_s=30,
            what="postgres to accept connections",
        )

    try:
        set_traffic(conninfo, "fraud_blend", 80.0)

        async def seen() -> bool:
            return [d["traffic_pct"] for d in await deployments(gateway, "fraud_blend")] == [80.0]

        # the listener's reconnect (backoff capped at 5 s) reloads; the periodic one takes 30 s
        await eventually(seen, timeout_s=10.0)
        set_traffic(conninfo, "fraud_blend", 90.0)

        async def notified() -> bool:
            return [d["traffic_pct"] for d in await deployments(gateway, "fraud_blend")] == [90.0]

        await eventually(notified, timeout_s=1.0)  # listening again
    finally:
        set_traffic(conninfo, "fraud_blend", 100.0)


async def test_default_prediction_log_writes_every_prediction_to_kafka(
    running_stack: StackState,
    stack_settings: Settings,
    conninfo: str,
    tmp_path: Path,
    live_settings: Settings,
) -> None:
    """Without an injected log the app logs to Kafka; each prediction appears once."""
    import orjson
    from confluent_kafka import Consumer, TopicPartition

    assert running_stack.kafka_bootstrap is not None
    settings = gateway_settings(live_settings, running_stack.triton_ports.grpc_url, conninfo)
    settings.gateway.kafka_bootstrap = running_stack.kafka_bootstrap
    settings.gateway.spool_dir = tmp_path / "spool"
    ids = {f"kafka-log-{i}" for i in range(20)}
    app = create_app(settings)  # no GatewayDeps: the configured (Kafka) prediction log
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway") as client,
    ):
        for rid in sorted(ids):
            r = await client.post("/predict/fraud_xgb", json={**BODY, "request_id": rid})
            assert r.status_code == 200, r.text
    # lifespan exit flushed the producer

    consumer = Consumer(
        {
            "bootstrap.servers": running_stack.kafka_bootstrap,
            "group.id": "test-default-prediction-log",
            "enable.auto.commit": False,
        }
    )
    try:
        meta = consumer.list_topics("predictions", timeout=10)
        parts = [TopicPartition("predictions", p, 0) for p in meta.topics["predictions"].partitions]
        consumer.assign(parts)
        seen: dict[str, int] = {}
        records = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and set(seen) < ids:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            rec = orjson.loads(msg.value())
            if rec["request_id"] in ids:
                seen[rec["request_id"]] = seen.get(rec["request_id"], 0) + 1
                records[rec["request_id"]] = rec
    finally:
        consumer.close()
    assert set(seen) == ids
    assert all(n == 1 for n in seen.values()), seen
    rec = records["kafka-log-0"]
    assert rec["model_name"] == "fraud_xgb" and rec["arm"] == "prod"
    assert len(rec["features"]) == 50 and rec["feature_hash"]
    assert set(rec["stage_latency_ms"]) >= {"route", "infer"}


async def test_past_max_in_flight_the_fallback_answers_at_once(
    running_stack: StackState,
    stack_settings: Settings,
    conninfo: str,
    live_settings: Settings,
) -> None:
    settings = gateway_settings(live_settings, running_stack.triton_ports.grpc_url, conninfo)
    settings.gateway.max_in_flight = 2
    async with serve(settings) as gw:
        responses = await asyncio.gather(
            *(gw.predict("fraud_xgb", {**BODY, "request_id": f"shed-{i}"}) for i in range(12))
        )
        metrics = (await gw.client.get("/metrics")).text
        (deployment,) = (await gw.client.get("/models/fraud_xgb")).json()["deployments"]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    shed = [r for r in responses if r.json()["degraded"]]
    served = [r for r in responses if not r.json()["degraded"]]
    assert served and shed, "some predictions reach Triton, the rest are shed"
    for r in shed:
        assert r.json()["degraded_reason"] == "gateway_overloaded:class_prior"
        assert r.json()["prediction"] == deployment["fallback"]["score"]
        assert r.headers["X-Prediction-Degraded"] == "true"
    assert 'reason="gateway_overloaded:class_prior"' in metrics
