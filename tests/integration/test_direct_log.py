"""Predictions of direct Triton clients are logged by the pipeline itself, exactly once, and
none is lost while Kafka is down (not even across a Triton restart)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from kafka_broker import Broker, running_broker_with_topics
from kafka_reader import consume_all
from test_gateway import BODY, RecordingLog, gateway_settings, serve

from gateway.catalog.dsn import dsn
from gateway.settings import Settings
from python_backend.contract import (
    CONTEXT_FEATURES,
    LOGGED_BY,
    LOGGED_BY_GATEWAY,
    LOGGED_BY_PROBE,
    OUTPUTS,
    ensemble_inputs,
)
from rtinfer import stack
from rtinfer.stack import StackState

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CONTEXT_ROW = [120.0, 3, 5, 1, 0, 1, 40, 0.2, 12.0, 0]


def call(
    module: Any,
    client: Any,
    endpoint: str,
    request_id: str,
    rows: int = 1,
    parameters: dict[str, str] | None = None,
) -> Any:
    inputs = ensemble_inputs(
        module,
        [f"u_{i + 1:06d}" for i in range(rows)],
        [f"m_{i + 1:05d}" for i in range(rows)],
        [CONTEXT_ROW] * rows,
    )
    outputs = [module.InferRequestedOutput(name) for name in OUTPUTS]
    return client.infer(
        endpoint, inputs, outputs=outputs, request_id=request_id, parameters=parameters
    )


def wait_for(
    bootstrap: str, wanted: set[str], timeout_s: float = 60.0
) -> dict[str, list[dict[str, Any]]]:
    """Records of ``predictions`` by request id, once every ``wanted`` id is there."""
    deadline = time.monotonic() + timeout_s
    while True:
        by_id: dict[str, list[dict[str, Any]]] = {}
        for record in consume_all(bootstrap, "predictions"):
            by_id.setdefault(record["request_id"], []).append(record)
        missing = wanted - set(by_id)
        if not missing or time.monotonic() > deadline:
            assert not missing, f"{len(missing)} records never reached Kafka: {sorted(missing)[:5]}"
            return by_id
        time.sleep(1.0)


@pytest.fixture(scope="module")
def grpc_client(running_stack: StackState) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(running_stack.triton_ports.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http_client(running_stack: StackState) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(running_stack.triton_ports.http_url)
    yield client
    client.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_each_door_logs_a_prediction_once(
    anyio_backend: str,
    running_stack: StackState,
    stack_settings: Settings,
    live_settings: Settings,
    grpc_client: grpcclient.InferenceServerClient,
    http_client: httpclient.InferenceServerClient,
) -> None:
    assert running_stack.kafka_bootstrap is not None and running_stack.postgres is not None
    tag = uuid.uuid4().hex[:8]
    # the gateway logs what it serves itself; the pipeline must not log it a second time
    conninfo = dsn(stack_settings.state_dir / "postgres", running_stack.postgres.port).conninfo
    settings = gateway_settings(live_settings, running_stack.triton_ports.grpc_url, conninfo)
    async with serve(settings) as gw:
        r = await gw.client.post("/predict/fraud_xgb", json={**BODY, "request_id": f"gw-{tag}"})
        assert r.status_code == 200, r.text
        gateway_log: RecordingLog = gw.log
    assert [rec["request_id"] for rec in gateway_log.records] == [f"gw-{tag}"]
    call(
        grpcclient,
        grpc_client,
        "fraud_xgb_pipeline",
        f"probe-{tag}",
        1,
        {LOGGED_BY: LOGGED_BY_PROBE},
    )
    call(
        grpcclient,
        grpc_client,
        "fraud_nn_pipeline",
        f"marked-{tag}",
        1,
        {LOGGED_BY: LOGGED_BY_GATEWAY},
    )
    # then the direct clients: one row over gRPC per pipeline, three rows in one HTTP request
    served = call(grpcclient, grpc_client, "fraud_xgb_pipeline", f"grpc-{tag}")
    call(grpcclient, grpc_client, "fraud_blend_pipeline", f"blend-{tag}")
    many = call(httpclient, http_client, "fraud_nn_pipeline", f"http-{tag}", rows=3)
    direct = {f"grpc-{tag}", f"blend-{tag}", *(f"http-{tag}/{i}" for i in range(3))}
    by_id = wait_for(running_stack.kafka_bootstrap, direct)
    time.sleep(1.0)  # anything logged wrongly was produced before the direct records
    by_id = wait_for(running_stack.kafka_bootstrap, direct)
    assert {rid: len(recs) for rid, recs in by_id.items() if rid in direct} == dict.fromkeys(
        direct, 1
    )
    for unlogged in (f"gw-{tag}", f"probe-{tag}", f"marked-{tag}"):
        assert unlogged not in by_id
    (record,) = by_id[f"grpc-{tag}"]
    assert record["arm"] == "direct" and record["deployment_id"] is None
    assert (record["model_name"], record["model_version"]) == ("fraud_xgb", "1")
    assert record["serving_endpoint"] == "fraud_xgb_pipeline"
    assert record["entity_ids"] == {"user_id": "u_000001", "merchant_id": "m_00001"}
    sent = np.float32(CONTEXT_ROW).tolist()  # the float32 values Triton received
    assert record["context"] == dict(zip(CONTEXT_FEATURES, sent, strict=True))
    assert record["prediction"] == pytest.approx(float(served.as_numpy("prediction")[0][0]))
    assert record["label"] == served.as_numpy("label")[0][0].decode()
    assert record["features"] == pytest.approx(served.as_numpy("features")[0].tolist())
    assert record["latency_ms"] is None and record["schema_version"] == 1
    assert by_id[f"blend-{tag}"][0]["model_name"] == "fraud_blend"
    for i in range(3):
        (row,) = by_id[f"http-{tag}/{i}"]
        assert row["model_name"] == "fraud_nn"
        assert row["entity_ids"]["user_id"] == f"u_{i + 1:06d}"
        assert row["prediction"] == pytest.approx(float(many.as_numpy("prediction")[i][0]))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    # private: stopping it must not disturb other tests
    yield from running_broker_with_topics(tmp_path_factory)


@pytest.fixture(scope="module")
def private_settings(
    built_repository: Path,
    make_stack_settings: Callable[[Path, Path], Settings],
    broker: Broker,
) -> Iterator[Settings]:
    """Redis and Triton of their own, on a copy of the repository, logging to ``broker``."""
    with tempfile.TemporaryDirectory(prefix="rtinfer-direct-log-") as state_dir:
        os.chmod(state_dir, 0o755)
        repository = Path(state_dir) / "model_repository"
        shutil.copytree(built_repository, repository, ignore=shutil.ignore_patterns("__pycache__"))
        settings = make_stack_settings(Path(state_dir) / "state", repository)
        settings.services = ["redis", "triton"]
        settings.gateway.kafka_bootstrap = broker.bootstrap
        settings.state_dir.mkdir(mode=0o755)
        yield settings


def test_direct_predictions_survive_a_kafka_outage_and_a_triton_restart(
    private_settings: Settings, broker: Broker
) -> None:
    state = stack.up(private_settings)
    try:
        client = grpcclient.InferenceServerClient(state.triton_ports.grpc_url)
        before = {f"before-{i}" for i in range(5)}
        during = {f"during-{i}" for i in range(30)}
        for rid in sorted(before):
            call(grpcclient, client, "fraud_xgb_pipeline", rid)
        wait_for(broker.bootstrap, before)
        broker.stop()
        try:
            for rid in sorted(during):
                started = time.perf_counter()
                result = call(grpcclient, client, "fraud_xgb_pipeline", rid)
                assert not bool(np.asarray(result.as_numpy("degraded"))[0][0])
                assert time.perf_counter() - started < 2.0  # Kafka is not on the serving path
            client.close()
            # Triton stops while Kafka is away: the stub spools what Kafka never confirmed
            stack.down(private_settings)
        finally:
            broker.start()
        # the next Triton's stub takes over the spool slot and replays it
        state = stack.up(private_settings)
        seen = wait_for(broker.bootstrap, before | during, timeout_s=90)
    finally:
        stack.down(private_settings)
    counts = Counter({rid: len(recs) for rid, recs in seen.items() if rid in before | during})
    assert set(counts) == before | during
    # at least once: a duplicate only for a record whose delivery report was lost
    assert sum(n - 1 for n in counts.values()) <= len(during), counts
    assert all(recs[0]["arm"] == "direct" for rid, recs in seen.items() if rid in during)
