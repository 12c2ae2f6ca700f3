"""End-to-end predictions through real Triton ensembles with features from real Redis."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import redis
import xgboost as xgb

from gateway.settings import Settings
from python_backend.contract import CONTEXT_FEATURES, context_vector
from python_backend.features.keys import entity_key
from rtinfer.client import FraudClient
from rtinfer.demo.dataset import generate_entities
from rtinfer.stack import StackState

pytestmark = pytest.mark.integration

PIPELINES = ("fraud_xgb_pipeline", "fraud_nn_pipeline", "fraud_blend_pipeline")
CONTEXT = {
    "amount": 420.0,
    "hour_of_day": 3,
    "day_of_week": 6,
    "channel": 0,
    "is_international": 1,
    "card_present": 0,
    "device_age_days": 1,
    "ip_risk_score": 0.9,
    "distance_from_home_km": 1200,
    "is_new_device": 1,
}


@pytest.fixture(scope="module")
def entities():  # type: ignore[no-untyped-def]
    return generate_entities(Settings().seed)


def _onnx_proba(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0][:, 1]


def offline_scores(repo: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """The models as their own libraries see them: XGBoost itself and the ONNX MLP."""
    booster = xgb.Booster()
    booster.load_model(str(repo / "fraud_xgb" / "1" / "xgboost.json"))
    p_xgb = booster.inplace_predict(x.astype(np.float32))
    p_nn = _onnx_proba(repo / "fraud_nn" / "1" / "model.onnx", x)
    w = Settings().postprocess.blend_weights
    p_blend = (w["fraud_xgb"] * p_xgb + w["fraud_nn"] * p_nn) / (w["fraud_xgb"] + w["fraud_nn"])
    return {
        "fraud_xgb_pipeline": p_xgb,
        "fraud_nn_pipeline": p_nn,
        "fraud_blend_pipeline": p_blend,
    }


def test_server_and_every_model_ready(running_stack: StackState, client: FraudClient) -> None:
    raw = client._client
    assert raw.is_server_ready()
    for name in running_stack.models:
        assert raw.is_model_ready(name), name
    for name in PIPELINES:
        assert name in running_stack.models


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_prediction_matches_offline_model(
    pipeline: str,
    client: FraudClient,
    entities,  # type: ignore[no-untyped-def]
    running_stack: StackState,
) -> None:
    rows = [(5, 3), (17, 11), (1234, 777), (19_999, 1_999)]
    users = [entities.user_ids[u] for u, _ in rows]
    merchants = [entities.merchant_ids[m] for _, m in rows]
    ctx = np.array([context_vector(CONTEXT)] * len(rows), dtype=np.float32)
    ctx[1, 0] = 12.5  # vary the amount
    expected_x = np.hstack(
        [
            entities.user_features[[u for u, _ in rows]],
            entities.merchant_features[[m for _, m in rows]],
            ctx,
        ]
    ).astype(np.float32)
    expected = offline_scores(Path(running_stack.model_repository), expected_x)[pipeline]

    got = client.predict(pipeline, users, merchants, ctx.tolist())

    for i, pred in enumerate(got):
        np.testing.assert_array_equal(np.array(pred.features, dtype=np.float32), expected_x[i])
        assert pred.prediction == pytest.approx(float(expected[i]), abs=1e-5)
        assert pred.imputed_count == 0
        assert not pred.degraded and pred.degraded_reason == ""
        assert pred.label in ("legit", "fraud")
        assert pred.confidence == pytest.approx(
            pred.prediction if pred.label == "fraud" else 1 - pred.prediction, abs=1e-6
        )


def test_unknown_entities_get_defaults(client: FraudClient, built_repository: Path) -> None:
    from python_backend.feature_spec import FeatureSpec

    spec = FeatureSpec.load(built_repository / "fraud_xgb" / "1" / "feature_spec.json")
    pred = client.predict_one("fraud_xgb_pipeline", "u_does_not_exist", "m_nope", CONTEXT)
    online = spec.indices("user") + spec.indices("merchant")
    assert pred.imputed_count == len(online) == 40
    assert not pred.degraded
    for i in online:
        assert pred.features[i] == pytest.approx(spec.features[i].default, rel=1e-6)
    assert 0.0 <= pred.prediction <= 1.0


def test_bad_fields_and_context_are_imputed(
    client: FraudClient,
    redis_client: redis.Redis,
    built_repository: Path,
    entities,  # type: ignore[no-untyped-def]
) -> None:
    from python_backend.feature_spec import FeatureSpec

    spec = FeatureSpec.load(built_repository / "fraud_xgb" / "1" / "feature_spec.json")
    user_defs = spec.group_features("user")
    values = {f.name: repr(float(entities.user_features[0][i])) for i, f in enumerate(user_defs)}
    values[user_defs[0].name] = "nan"
    values[user_defs[1].name] = "not-a-number"
    values[user_defs[2].name] = repr(user_defs[2].max * 10 + 1e6)  # out of range
    del values[user_defs[3].name]  # missing field
    key = entity_key("user", "u_partial_test")
    redis_client.delete(key)
    redis_client.hset(key, mapping=values)
    ctx = dict(CONTEXT)
    ctx.pop("hour_of_day")  # sent as NaN by the client
    pred = client.predict_one("fraud_xgb_pipeline", "u_partial_test", entities.merchant_ids[0], ctx)
    assert pred.imputed_count == 5
    for i in range(4):
        assert pred.features[i] == pytest.approx(user_defs[i].default, rel=1e-6)
    hour = spec.names.index("hour_of_day")
    assert pred.features[hour] == pytest.approx(spec.features[hour].default, rel=1e-6)
    assert set(CONTEXT_FEATURES) == {f.name for f in spec.group_features("context")}


def test_many_concurrent_requests_are_batched_and_correct(
    running_stack: StackState,
    protocol: str,
    entities,  # type: ignore[no-untyped-def]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    ports = running_stack.triton_ports
    url = ports.http_url if protocol == "http" else ports.grpc_url

    def run(ids: range) -> list[float]:
        # one client per thread: the HTTP client is not thread-safe
        with FraudClient(url, protocol) as c:  # type: ignore[arg-type]
            return [
                c.predict_one(
                    "fraud_xgb_pipeline",
                    entities.user_ids[i],
                    entities.merchant_ids[i % 2000],
                    CONTEXT,
                ).prediction
                for i in ids
            ]

    chunks = [range(200 + 8 * k, 208 + 8 * k) for k in range(8)]
    with ThreadPoolExecutor(8) as pool:
        concurrent = [p for chunk in pool.map(run, chunks) for p in chunk]
    sequential = run(range(200, 264))
    assert concurrent == pytest.approx(sequential, abs=1e-6)
    assert all(not math.isnan(p) for p in concurrent)
