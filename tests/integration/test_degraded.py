"""Redis outage: responses degrade to the context-only fallback, then recover."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import redis
import tritonclient.http as httpclient

from gateway.settings import Settings
from python_backend.contract import context_vector
from rtinfer.client import FraudClient
from rtinfer.features import load_demo_features
from rtinfer.procs import wait_until
from rtinfer.stack import StackState
from rtinfer.supervisor import Supervisor

pytestmark = pytest.mark.integration

CONTEXT = {
    "amount": 980.0,
    "hour_of_day": 4,
    "channel": 0,
    "ip_risk_score": 0.95,
    "is_international": 1,
    "is_new_device": 1,
}
PIPELINES = ("fraud_xgb_pipeline", "fraud_nn_pipeline", "fraud_blend_pipeline")


def _fallback_score(repo: Path, context: dict[str, float], spec_defaults: list[float]) -> float:
    vec = np.array(context_vector(context), dtype=np.float32)
    vec = np.where(np.isnan(vec), np.array(spec_defaults, dtype=np.float32), vec)
    sess = ort.InferenceSession(str(repo / "fraud_context_lr" / "1" / "model.onnx"))
    return float(sess.run(None, {"input__0": vec[None, :]})[0][0, 1])


@pytest.fixture()
def redis_down(running_stack: StackState, stack_settings: Settings) -> Iterator[None]:
    """Stop the stack's redis-server through its supervisor (it stays down: a clean stop);
    start it again after, features reloaded."""
    supervisor = Supervisor(stack_settings.state_dir)
    supervisor.stop("redis")
    try:
        yield
    finally:
        supervisor.start_program("redis")
        client = redis.Redis.from_url(running_stack.redis_url, socket_timeout=1)
        wait_until(lambda: bool(client.ping()), timeout_s=15, what="redis PING")
        load_demo_features(client, seed=stack_settings.seed)
        client.close()


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_redis_outage_degrades_to_fallback_then_recovers(
    redis_down: None,
    clients: dict[str, FraudClient],
    running_stack: StackState,
    built_repository: Path,
) -> None:
    from python_backend.feature_spec import FeatureSpec

    lr_spec = FeatureSpec.load(built_repository / "fraud_context_lr" / "1" / "feature_spec.json")
    expected = _fallback_score(built_repository, CONTEXT, [f.default for f in lr_spec.features])
    n = 0
    for protocol, client in clients.items():
        for pipeline in PIPELINES:
            for _ in range(5):  # before and after the breaker opens
                n += 1
                # entities never requested before: not in the hot-entity cache
                pred = client.predict_one(pipeline, f"u_{17000 + n:06d}", "m_01999", CONTEXT)
                assert pred.degraded, (protocol, pipeline)
                assert pred.degraded_reason == "feature_store_unavailable:fraud_context_lr"
                assert pred.prediction == pytest.approx(expected, abs=1e-5)
                assert len(pred.features) == 50


def test_fallback_model_unavailable_uses_class_prior(
    redis_down: None,
    clients: dict[str, FraudClient],
    running_stack: StackState,
    built_repository: Path,
) -> None:
    from python_backend.feature_spec import TrainingStats

    prior = TrainingStats.load(
        built_repository / "fraud_xgb" / "1" / "training_stats.json"
    ).class_prior
    admin = httpclient.InferenceServerClient(running_stack.triton_ports.http_url)
    admin.unload_model("fraud_context_lr")
    try:
        assert _wait_for(lambda: not admin.is_model_ready("fraud_context_lr"))
        pred = clients["grpc"].predict_one("fraud_xgb_pipeline", "u_018500", "m_00002", CONTEXT)
        assert pred.degraded
        assert pred.degraded_reason == "feature_store_unavailable:class_prior"
        assert pred.prediction == pytest.approx(prior, abs=1e-6)
    finally:
        admin.load_model("fraud_context_lr")
        assert _wait_for(lambda: admin.is_model_ready("fraud_context_lr"))
        admin.close()


def test_recovers_when_redis_returns(
    clients: dict[str, FraudClient], running_stack: StackState
) -> None:
    """Runs after the outage fixtures restarted Redis: the breaker closes again."""
    client = clients["http"]

    def healthy() -> bool:
        pred = client.predict_one("fraud_xgb_pipeline", "u_018900", "m_00003", CONTEXT)
        return not pred.degraded and pred.imputed_count == 4  # the 4 absent context features

    assert _wait_for(healthy, timeout_s=10.0)
