"""Shadow mirroring with a fake Triton: sampling, records, failures, the in-flight cap, shutdown."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError

from gateway.auth.credentials import ApiKey
from gateway.auth.guards import is_admin
from gateway.catalog.records import Deployment
from gateway.catalog.shadows import CatalogUnavailable, remove_shadows
from gateway.errors import ModelNotReady, describe_validation_errors
from gateway.metrics import GatewayMetrics
from gateway.schemas import PredictRequest, ShadowRequest
from gateway.serving.shadow import ShadowMirror, sampled, shadow_bucket
from python_backend.contract import InferenceResult
from rtinfer.procs import free_port

pytestmark = pytest.mark.anyio

MODEL = "fraud_xgb"
REQUEST = PredictRequest.model_validate(
    {
        "entity_ids": {"user_id": "u_000042", "merchant_id": "m_00007"},
        "context": {"amount": 129.99},
        "feature_overrides": {"hour_of_day": 3.0},
    }
)
IDS = [f"req-{i}" for i in range(10_000)]


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


def shadow(
    dep_id: int = 7, sample_pct: float = 100.0, endpoint: str = "fraud_nn_pipeline"
) -> Deployment:
    return Deployment(
        deployment_id=dep_id,
        model_name=MODEL,
        model_version=f"shadow-{dep_id}",
        serving_endpoint=endpoint,
        traffic_pct=0.0,
        is_shadow=True,
        shadow_sample_pct=sample_pct,
    )


def production(request_id: str = "req-1") -> dict[str, Any]:
    """A production record as ``PredictionService`` builds it."""
    return {
        "request_id": request_id,
        "timestamp": 1_700_000_000.25,
        "model_name": MODEL,
        "model_version": "1",
        "deployment_id": 1,
        "arm": "prod",
        "serving_endpoint": "fraud_xgb_pipeline",
        "entity_ids": {"user_id": "u_000042", "merchant_id": "m_00007"},
        "context": {"amount": 129.99},
        "feature_overrides": {"hour_of_day": 3.0},
        "features": [0.5] * 50,
        "prediction": 0.91,
        "label": "fraud",
        "confidence": 0.91,
        "degraded": False,
        "degraded_reason": None,
        "latency_ms": 2.5,
        "stage_latency_ms": {"route": 0.01, "infer": 2.4},
    }


RESULT = InferenceResult(
    prediction=0.12,
    label="legit",
    confidence=0.88,
    degraded=False,
    degraded_reason="",
    imputed_count=0,
    features=[0.25] * 50,
)


@dataclass
class FakeTriton:
    """Answers ``RESULT`` after ``delay_s``, or raises ``error``; remembers each call."""

    delay_s: float = 0.0
    error: Exception | None = None
    release: asyncio.Event | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)

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
        self.calls.append(
            {
                "endpoint": endpoint,
                "user_id": user_id,
                "merchant_id": merchant_id,
                "context": list(context),
                "request_id": request_id,
                "timeout_s": timeout_s,
            }
        )
        if self.release is not None:
            await self.release.wait()
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return RESULT


@dataclass
class RecordingLog:
    records: list[dict[str, Any]] = field(default_factory=list)

    def log(self, record: Mapping[str, Any]) -> None:
        self.records.append(dict(record))


def mirror_for(
    triton: FakeTriton, *, timeout_s: float = 1.0, max_in_flight: int = 8
) -> tuple[ShadowMirror, RecordingLog, GatewayMetrics]:
    plog, metrics = RecordingLog(), GatewayMetrics()
    mirror = ShadowMirror(
        triton=triton,
        prediction_log=plog,
        metrics=metrics,
        timeout_s=timeout_s,
        max_in_flight=max_in_flight,
    )
    return mirror, plog, metrics


async def settle() -> None:
    """Let every runnable task step until it waits."""
    for _ in range(10):
        await asyncio.sleep(0)


def count(metrics: GatewayMetrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "rtinfer_gateway_shadow_requests_total", {"model": MODEL, "outcome": outcome}
    )
    return value or 0.0


# -- sampling --------------------------------------------------------------------------------


@pytest.mark.parametrize("pct", [1.0, 10.0, 30.0, 75.0])
def test_sample_share_follows_sample_pct_within_2_points(pct: float) -> None:
    share = 100.0 * sum(sampled(MODEL, rid, pct) for rid in IDS) / len(IDS)
    assert share == pytest.approx(pct, abs=2.0)


def test_sampling_is_sticky_per_request_id_and_nested_across_shares() -> None:
    at_10 = {rid for rid in IDS if sampled(MODEL, rid, 10.0)}
    at_50 = {rid for rid in IDS if sampled(MODEL, rid, 50.0)}
    assert at_10 == {rid for rid in IDS if sampled(MODEL, rid, 10.0)}
    assert at_10 < at_50
    assert all(sampled(MODEL, rid, 100.0) for rid in IDS)
    assert not any(sampled(MODEL, rid, 0.0) for rid in IDS)
    # another model's shadows sample other requests
    assert {rid for rid in IDS if sampled("fraud_nn", rid, 10.0)} != at_10
    assert 0.0 <= min(shadow_bucket(MODEL, rid) for rid in IDS) < 1.0


# -- records ---------------------------------------------------------------------------------


async def test_shadow_record_has_the_request_id_the_shadow_answer_and_the_production_one() -> None:
    triton = FakeTriton()
    mirror, plog, metrics = mirror_for(triton)
    mirror.mirror([shadow()], REQUEST, production())
    await mirror.close()

    (call,) = triton.calls
    assert call["endpoint"] == "fraud_nn_pipeline" and call["request_id"] == "req-1"
    assert (call["user_id"], call["merchant_id"]) == ("u_000042", "m_00007")
    assert call["context"][:2] == [129.99, 3.0]  # amount as sent, hour_of_day overridden
    assert call["timeout_s"] == 1.0

    (record,) = plog.records
    assert {k: record[k] for k in ("request_id", "timestamp", "model_name", "arm")} == {
        "request_id": "req-1",
        "timestamp": 1_700_000_000.25,
        "model_name": MODEL,
        "arm": "shadow",
    }
    assert (record["deployment_id"], record["model_version"], record["serving_endpoint"]) == (
        7,
        "shadow-7",
        "fraud_nn_pipeline",
    )
    assert (record["prediction"], record["label"], record["confidence"]) == (0.12, "legit", 0.88)
    assert record["features"] == [0.25] * 50
    assert (record["degraded"], record["degraded_reason"], record["error"]) == (False, None, None)
    assert record["entity_ids"] == production()["entity_ids"]
    assert record["context"] == {"amount": 129.99}
    assert record["feature_overrides"] == {"hour_of_day": 3.0}
    assert record["sample_pct"] == 100.0
    assert record["latency_ms"] >= 0 and record["stage_latency_ms"] == {
        "infer": record["latency_ms"]
    }
    assert record["production"] == {
        "model_version": "1",
        "deployment_id": 1,
        "arm": "prod",
        "serving_endpoint": "fraud_xgb_pipeline",
        "prediction": 0.91,
        "label": "fraud",
        "confidence": 0.91,
        "degraded": False,
        "degraded_reason": None,
        "latency_ms": 2.5,
    }
    json.dumps(record)  # serializable as it is
    assert count(metrics, "ok") == 1.0


async def test_each_shadow_gets_its_own_record_and_unsampled_requests_none() -> None:
    triton = FakeTriton()
    mirror, plog, metrics = mirror_for(triton, max_in_flight=1000)
    shadows = [shadow(7), shadow(8, endpoint="fraud_blend_pipeline"), shadow(9, sample_pct=10.0)]
    ids = IDS[:200]
    for rid in ids:
        mirror.mirror(shadows, REQUEST, production(rid))
    await mirror.close()
    per_shadow = {
        dep: {r["request_id"] for r in plog.records if r["deployment_id"] == dep}
        for dep in (7, 8, 9)
    }
    assert per_shadow[7] == per_shadow[8] == set(ids)
    assert per_shadow[9] == {rid for rid in ids if sampled(MODEL, rid, 10.0)}
    assert 5 <= len(per_shadow[9]) <= 40
    assert count(metrics, "ok") == len(plog.records)


# -- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (ModelNotReady("model not loaded: fraud_nn_pipeline"), "model_not_ready", "not loaded"),
        (RuntimeError("boom"), "internal_error", "RuntimeError: boom"),
    ],
    ids=["typed", "unexpected"],
)
async def test_failed_shadow_call_is_recorded_with_its_error_and_counted(
    error: Exception, code: str, message: str
) -> None:
    mirror, plog, metrics = mirror_for(FakeTriton(error=error))
    mirror.mirror([shadow()], REQUEST, production())
    await mirror.close()
    (record,) = plog.records
    assert record["arm"] == "shadow" and record["request_id"] == "req-1"
    assert record["error"]["code"] == code and message in record["error"]["message"]
    assert (record["prediction"], record["label"], record["features"]) == (None, None, [])
    assert record["production"]["prediction"] == 0.91
    assert (count(metrics, "error"), count(metrics, "ok")) == (1.0, 0.0)


async def test_slow_shadow_times_out_with_its_own_timeout() -> None:
    mirror, plog, metrics = mirror_for(FakeTriton(delay_s=5.0), timeout_s=0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    mirror.mirror([shadow()], REQUEST, production())
    await mirror.close()
    assert loop.time() - started < 1.0
    (record,) = plog.records
    assert record["error"] == {"code": "deadline_exceeded", "message": "no answer within 50 ms"}
    assert count(metrics, "error") == 1.0
    seconds = metrics.registry.get_sample_value(
        "rtinfer_gateway_shadow_seconds_count", {"model": MODEL, "outcome": "error"}
    )
    assert seconds == 1.0


async def test_a_raising_prediction_log_is_counted_not_raised() -> None:
    class Broken:
        def log(self, record: Mapping[str, Any]) -> None:
            raise OSError("disk full")

    metrics = GatewayMetrics()
    mirror = ShadowMirror(
        triton=FakeTriton(),
        prediction_log=Broken(),
        metrics=metrics,
        timeout_s=1.0,
        max_in_flight=4,
    )
    mirror.mirror([shadow()], REQUEST, production())
    await mirror.close()
    assert metrics.registry.get_sample_value("rtinfer_gateway_prediction_log_errors_total") == 1.0
    assert count(metrics, "ok") == 1.0


# -- bounds and lifecycle --------------------------------------------------------------------


async def test_beyond_the_in_flight_cap_requests_are_dropped_and_counted() -> None:
    release = asyncio.Event()
    triton = FakeTriton(release=release)
    mirror, plog, metrics = mirror_for(triton, max_in_flight=2)
    for rid in IDS[:5]:
        mirror.mirror([shadow()], REQUEST, production(rid))
    assert mirror.in_flight == 2
    assert count(metrics, "dropped") == 3.0
    await settle()
    assert len(triton.calls) == 2 and not plog.records  # the two calls wait for Triton
    release.set()
    await mirror.close()
    assert [r["request_id"] for r in plog.records] == IDS[:2]
    assert (count(metrics, "ok"), count(metrics, "dropped")) == (2.0, 3.0)
    assert mirror.in_flight == 0


async def test_mirror_returns_before_any_shadow_call_runs() -> None:
    triton = FakeTriton()
    mirror, plog, _ = mirror_for(triton)
    mirror.mirror([shadow()], REQUEST, production())
    assert triton.calls == [] and plog.records == []  # only scheduled
    await mirror.close()
    assert len(plog.records) == 1


async def test_close_cancels_calls_still_running_after_its_timeout_and_refuses_new_ones() -> None:
    triton = FakeTriton(release=asyncio.Event())  # never released
    mirror, plog, metrics = mirror_for(triton, timeout_s=30.0)
    mirror.mirror([shadow()], REQUEST, production())
    await settle()
    assert len(triton.calls) == 1
    await mirror.close(timeout_s=0.05)
    assert mirror.in_flight == 0 and plog.records == []
    mirror.mirror([shadow()], REQUEST, production("req-2"))
    assert mirror.in_flight == 0 and count(metrics, "dropped") == 1.0


# -- the registration body and the admin check -----------------------------------------------


def refused(body: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as err:
        ShadowRequest.model_validate(body)
    return describe_validation_errors(err.value.errors())


def test_shadow_request_defaults_and_refusals_name_the_field() -> None:
    body = ShadowRequest.model_validate(
        {"model_version": "2", "serving_endpoint": "fraud_nn_pipeline"}
    )
    assert (body.sample_pct, body.feature_groups, body.fallback_config) == (100.0, None, None)
    assert (
        ShadowRequest.model_validate(
            {"model_version": "2", "serving_endpoint": "e", "sample_pct": 5}
        ).sample_pct
        == 5.0
    )

    base = {"model_version": "2", "serving_endpoint": "fraud_nn_pipeline"}
    assert refused({**base, "sample_pct": 150}).startswith("sample_pct:")
    assert refused({**base, "sample_pct": 0}).startswith("sample_pct:")
    assert refused({**base, "sample_pct": float("nan")}).startswith("sample_pct:")
    assert refused({**base, "sample_pct": "50"}).startswith("sample_pct:")
    assert refused({**base, "serving_endpoint": "bad name"}).startswith("serving_endpoint:")
    assert refused({"serving_endpoint": "e"}).startswith("model_version: Field required")
    assert refused({**base, "traffic_pct": 10}).startswith("traffic_pct: Extra inputs")
    assert refused({**base, "feature_groups": [""]}).startswith("feature_groups.0:")
    assert refused(
        {**base, "fallback_config": {"type": "class_prior", "score": 2, "threshold": 0.5}}
    ).startswith("fallback_config.score:")
    assert "fallback_config.type" in refused({**base, "fallback_config": {"type": "mean"}})


def test_only_principals_with_is_admin_true_may_change_the_catalog() -> None:
    assert is_admin(ApiKey("k1", "ops", True, None))
    assert not is_admin(ApiKey("k2", "app", False, 10.0))
    assert not is_admin(None)
    assert not is_admin({"is_admin": True})  # a dict is not a principal


async def test_catalog_writes_while_postgres_is_unreachable_are_503_not_500() -> None:
    conninfo = f"host=127.0.0.1 port={free_port()} dbname=x user=x connect_timeout=1"
    pool = AsyncConnectionPool(conninfo, min_size=1, open=False, timeout=0.3)
    await pool.open(wait=False)
    try:
        with pytest.raises(CatalogUnavailable) as err:
            await remove_shadows(pool, MODEL, None, actor=None)
    finally:
        await pool.close()
    assert (err.value.status, err.value.code) == (503, "catalog_unavailable")
    assert "database is unavailable" in err.value.message
