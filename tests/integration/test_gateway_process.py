"""The gateway as `stack up` runs it: a uvicorn process with API keys and per-key rate limits."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import psycopg
import pytest

from gateway.auth.key_store import create_api_key
from gateway.catalog.dsn import dsn
from gateway.settings import Settings
from rtinfer.client import FraudClient
from rtinfer.stack import StackState

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

USER, MERCHANT = "u_000314", "m_00042"
CONTEXT = {"amount": 980.0, "hour_of_day": 3, "ip_risk_score": 0.7, "is_new_device": 1}
BODY = {"entity_ids": {"user_id": USER, "merchant_id": MERCHANT}, "context": CONTEXT}


@pytest.fixture(scope="module")
def http(running_stack: StackState) -> Iterator[httpx.Client]:
    assert running_stack.gateway_url is not None
    with httpx.Client(base_url=running_stack.gateway_url, timeout=10.0) as client:
        yield client


@pytest.fixture(scope="module")
def catalog_db(running_stack: StackState, stack_settings: Settings) -> Iterator[psycopg.Connection]:
    assert running_stack.postgres is not None
    conninfo = dsn(stack_settings.state_dir / "postgres", running_stack.postgres.port).conninfo
    with psycopg.connect(conninfo, autocommit=True) as conn:
        yield conn


def test_health_and_metrics_are_open_predictions_need_a_key(http: httpx.Client) -> None:
    assert http.get("/livez").status_code == 200
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert http.get("/metrics").status_code == 200

    for path in ("/models", "/models/fraud_xgb", "/predict/fraud_xgb/health"):
        r = http.get(path)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "missing_api_key"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = http.post("/predict/fraud_xgb", json=BODY, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "malformed_api_key"


def test_keyed_prediction_equals_triton_direct(
    http: httpx.Client, catalog_db: psycopg.Connection, clients: dict[str, FraudClient]
) -> None:
    _, token = create_api_key(catalog_db, "process-test")
    for header in ({"Authorization": f"Bearer {token}"}, {"X-API-Key": token}):
        r = http.post("/predict/fraud_xgb", json={**BODY, "deadline_ms": 5000}, headers=header)
        assert r.status_code == 200, r.text
        direct = clients["grpc"].predict_one("fraud_xgb_pipeline", USER, MERCHANT, CONTEXT)
        assert r.json()["prediction"] == pytest.approx(direct.prediction, abs=1e-6)
        assert r.json()["degraded"] is False
    assert http.get("/models", headers={"X-API-Key": token}).status_code == 200


def test_rate_limited_key_gets_429_with_retry_after(
    http: httpx.Client, catalog_db: psycopg.Connection
) -> None:
    # 1 request/s, bucket of 2 (burst multiplier 2): the third request in a row is refused
    _, token = create_api_key(catalog_db, "slow-client", rate_limit_per_s=1.0)
    headers = {"X-API-Key": token}
    statuses = [
        http.post("/predict/fraud_xgb", json=BODY, headers=headers).status_code for _ in range(4)
    ]
    assert statuses[:2] == [200, 200] and 429 in statuses[2:], statuses
    r = http.post("/predict/fraud_xgb", json=BODY, headers=headers)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    # other keys are not affected
    _, other = create_api_key(catalog_db, "other-client")
    assert http.get("/models", headers={"X-API-Key": other}).status_code == 200


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not exported")


def test_the_prediction_log_and_its_spool_are_on_metrics(
    http: httpx.Client, catalog_db: psycopg.Connection
) -> None:
    before = _sample(http.get("/metrics").text, "rtinfer_prediction_log_produced_total")
    _, token = create_api_key(catalog_db, "metrics-test")
    r = http.post("/predict/fraud_xgb", json=BODY, headers={"X-API-Key": token})
    assert r.status_code == 200, r.text
    text = http.get("/metrics").text
    assert _sample(text, "rtinfer_prediction_log_produced_total") == before + 1
    for gauge in (
        "rtinfer_prediction_log_spool_records",
        "rtinfer_prediction_log_spool_bytes",
        "rtinfer_prediction_log_in_flight",
        "rtinfer_prediction_log_dropped_total",
        "rtinfer_prediction_log_recovered_total",
    ):
        assert _sample(text, gauge) >= 0, gauge
