"""The prediction store on the real stack: Kafka -> sink -> embedded ClickHouse (chdb).

Every prediction (gateway and direct Triton) is stored once however often it was delivered,
a poison record is dead-lettered without stalling its partition, a sink killed mid-batch
loses and double-counts nothing, labels join, and replay reproduces the served scores.
"""

from __future__ import annotations

import io
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pyarrow.parquet as pq
import pytest
import tritonclient.grpc as grpcclient
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from test_direct_log import call

from gateway.asyncpred.lag import LagReader
from gateway.auth.key_store import create_api_key
from gateway.catalog.dsn import dsn
from gateway.settings import Settings
from gateway.store import queries
from gateway.store.backend import Store, open_store, rows
from gateway.store.replay import logged_rows, replay, served_scorer
from gateway.store.replay_triton import triton_runner
from gateway.store.sink import DLQ_REASON, DLQ_SOURCE
from rtinfer import stack
from rtinfer.cli_predictions import artifact_locator
from rtinfer.registry import register_version
from rtinfer.stack import StackState

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BODY = {
    "entity_ids": {"user_id": "u_000314", "merchant_id": "m_00042"},
    "context": {"amount": 980.0, "hour_of_day": 3, "ip_risk_score": 0.7, "is_new_device": 1},
}


@pytest.fixture(scope="module")
def store(running_stack: StackState, live_settings: Settings) -> Iterator[Store]:
    assert running_stack.store is not None and running_stack.sinks
    s = open_store(live_settings.store_url())
    yield s
    s.close()


@pytest.fixture(scope="module")
def gateway(running_stack: StackState, stack_settings: Settings) -> Iterator[httpx.Client]:
    assert running_stack.gateway_url is not None and running_stack.postgres is not None
    conninfo = dsn(stack_settings.state_dir / "postgres", running_stack.postgres.port).conninfo
    with psycopg.connect(conninfo, autocommit=True) as db:
        _, token = create_api_key(db, f"store-{uuid.uuid4().hex[:6]}", is_admin=True)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=running_stack.gateway_url, headers=headers, timeout=10) as c:
        yield c


def stored(store: Store, ids: set[str], timeout_s: float = 30.0) -> dict[str, int]:
    """Rows per request id (FINAL) once every id of ``ids`` is in the store."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = rows(
            store,
            "SELECT request_id, count() AS n FROM predictions FINAL "
            "WHERE has({ids:Array(String)}, request_id) AND arm != 'shadow' GROUP BY request_id",
            {"ids": sorted(ids)},
        )
        counts = {r["request_id"]: r["n"] for r in found}
        if set(counts) == ids or time.monotonic() > deadline:
            missing = ids - set(counts)
            assert not missing, f"{len(missing)} never stored, e.g. {sorted(missing)[:3]}"
            return counts
        time.sleep(0.5)


def raw_messages(bootstrap: str, topic: str, keys: set[bytes]) -> list[tuple[bytes, bytes]]:
    """(key, value) of every message of ``topic`` with one of ``keys``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        high = {p: consumer.get_watermark_offsets(TopicPartition(topic, p))[1] for p in parts}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        pending, out = {p for p, h in high.items() if h > 0}, []
        while pending:
            msg = consumer.poll(1.0)
            if msg is None or msg.error() is not None:
                continue
            if msg.key() in keys:
                out.append((msg.key(), msg.value()))
            if msg.offset() + 1 >= high[msg.partition()]:
                pending.discard(msg.partition())
        return out
    finally:
        consumer.close()


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for key, value in messages:
        producer.produce(topic, value, key)
        producer.poll(0)
    assert producer.flush(30) == 0


def caught_up(bootstrap: str, settings: Settings, timeout_s: float = 60.0) -> None:
    """Wait until the sinks' group has committed everything now in ``predictions``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex})
    parts = consumer.list_topics("predictions", timeout=10).topics["predictions"].partitions
    consumer.close()
    reader = LagReader(bootstrap, settings.store.group_id)
    deadline = time.monotonic() + timeout_s
    while sum(reader.read([("predictions", p) for p in parts]).values()) > 0:
        assert time.monotonic() < deadline, "the sink never caught up"
        time.sleep(0.5)


def test_each_prediction_is_stored_once_after_duplicates(
    running_stack: StackState, live_settings: Settings, gateway: httpx.Client, store: Store
) -> None:
    tag = uuid.uuid4().hex[:8]
    served = {}
    for i, model in enumerate(["fraud_xgb", "fraud_nn", "fraud_blend"] * 4):
        rid = f"gw-{tag}-{i}"
        r = gateway.post(f"/predict/{model}", json={**BODY, "request_id": rid})
        assert r.status_code == 200, r.text
        served[rid] = r.json()
    client = grpcclient.InferenceServerClient(running_stack.triton_ports.grpc_url)
    for i in range(12):
        call(grpcclient, client, "fraud_xgb_pipeline", f"direct-{tag}-{i}")
    client.close()
    ids = {*served, *(f"direct-{tag}-{i}" for i in range(12))}
    assert set(stored(store, ids).values()) == {1}
    # deliver every record again, as a spool replay after a crash would
    bootstrap = running_stack.kafka_bootstrap
    assert bootstrap is not None
    again = raw_messages(bootstrap, "predictions", {i.encode() for i in ids})
    assert len(again) == len(ids)
    produce(bootstrap, "predictions", again)
    caught_up(bootstrap, live_settings)  # the sink committed past the copies: stored
    assert set(stored(store, ids).values()) == {1}  # FINAL: each counted once
    shown = gateway.get(f"/predictions/gw-{tag}-0").json()
    (record,) = shown["records"]
    assert record["door"] == "gateway" and record["prediction"] == pytest.approx(
        served[f"gw-{tag}-0"]["prediction"]
    )
    direct = queries.show(store, f"direct-{tag}-0")
    assert direct is not None and direct["records"][0]["door"] == "direct"


def test_poison_records_are_dead_lettered_and_the_partition_moves_on(
    running_stack: StackState, store: Store
) -> None:
    bootstrap = running_stack.kafka_bootstrap
    assert bootstrap is not None
    tag = uuid.uuid4().hex[:8]
    good = {
        "schema_version": 1,
        "request_id": f"after-poison-{tag}",
        "timestamp": time.time(),
        "model_name": "fraud_xgb",
        "model_version": "1",
        "arm": "prod",
        "features": [0.5],
        "prediction": 0.5,
        "label": "fraud",
        "degraded": False,
    }
    key = f"poison-{tag}".encode()  # one key: all three land in one partition, in order
    produce(
        bootstrap,
        "predictions",
        [
            (key, b"{not json"),
            (key, orjson.dumps({**good, "request_id": None})),
            (key, orjson.dumps({**good, "request_id": key.decode()})),
        ],
    )
    stored(store, {key.decode()})
    dead = []
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex})
    consumer.assign([TopicPartition("predictions-dlq", 0, OFFSET_BEGINNING)])
    deadline = time.monotonic() + 30
    while len(dead) < 2 and time.monotonic() < deadline:
        msg = consumer.poll(1.0)
        if msg is not None and msg.error() is None and msg.key() == key:
            dead.append(dict(msg.headers() or []))
    consumer.close()
    assert sorted(h[DLQ_REASON] for h in dead) == [b"invalid_json", b"missing_field"]
    assert all(h[DLQ_SOURCE].startswith(b"predictions/") for h in dead)


def test_a_sink_killed_mid_batch_loses_and_double_counts_nothing(
    running_stack: StackState, stack_settings: Settings, store: Store
) -> None:
    bootstrap = running_stack.kafka_bootstrap
    assert bootstrap is not None
    tag = uuid.uuid4().hex[:8]
    total = 6_000
    base = {
        "schema_version": 1,
        "timestamp": time.time(),
        "model_name": f"kill_{tag}",
        "model_version": "1",
        "arm": "prod",
        "features": [0.25] * 50,
        "prediction": 0.1,
        "label": "legit",
        "degraded": False,
    }
    messages = [
        (f"k-{tag}-{i}".encode(), orjson.dumps({**base, "request_id": f"k-{tag}-{i}"}))
        for i in range(total)
    ]
    produce(bootstrap, "predictions", messages)
    count = "SELECT count() AS n FROM predictions WHERE model_name = {m:String}"
    deadline = time.monotonic() + 60
    while rows(store, count, {"m": f"kill_{tag}"})[0]["n"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(stack.service_pid(stack_settings.state_dir, "sink-0"), signal.SIGKILL)
    final = count.replace("FROM predictions", "FROM predictions FINAL")
    deadline = time.monotonic() + 120
    while rows(store, final, {"m": f"kill_{tag}"})[0]["n"] < total:
        assert time.monotonic() < deadline, "the restarted sink never caught up"
        time.sleep(0.5)
    exact = (
        "SELECT count() AS n, uniqExact(request_id) AS u FROM predictions FINAL "
        "WHERE model_name = {m:String}"
    )
    assert rows(store, exact, {"m": f"kill_{tag}"}) == [{"n": total, "u": total}]


def test_feedback_joins_exports_and_replay_reproduces(
    running_stack: StackState, live_settings: Settings, gateway: httpx.Client, store: Store
) -> None:
    tag = uuid.uuid4().hex[:8]
    served: dict[str, dict[str, Any]] = {}
    for i in range(30):
        rid = f"fb-{tag}-{i}"
        body = {
            **BODY,
            "request_id": rid,
            "entity_ids": {"user_id": f"u_{i + 1:06d}", "merchant_id": f"m_{i + 1:05d}"},
        }
        r = gateway.post("/predict/fraud_xgb", json=body)
        assert r.status_code == 200, r.text
        served[rid] = r.json()
    labels = [
        {"request_id": rid, "label": "fraud" if i % 3 == 0 else "legit", "source": "chargeback"}
        for i, rid in enumerate(served)
    ]
    assert gateway.post("/feedback", json=labels).json() == {"accepted": 30}
    # idempotent: the same labels again change nothing; unknown values are refused
    assert gateway.post("/feedback", json=labels[0]).status_code == 202
    bad = gateway.post("/feedback", json={**labels[0], "label": "suspicious"})
    assert bad.status_code == 422 and "label" in bad.json()["error"]["message"]
    stored(store, set(served))
    deadline = time.monotonic() + 30
    while True:
        shown = queries.show(store, f"fb-{tag}-0")
        if shown and shown["labels"]:
            break
        assert time.monotonic() < deadline, "labels never stored"
        time.sleep(0.5)
    assert [x["label"] for x in shown["labels"]] == ["fraud"]
    table = pq.read_table(
        io.BytesIO(queries.export_parquet(store, "fraud_xgb", 3600, with_labels=True))
    )
    exported = dict(
        zip(table.column("request_id").to_pylist(), table.column("label").to_pylist(), strict=True)
    )
    assert {rid: exported[rid] for rid in served} == {
        x["request_id"]: (1.0 if x["label"] == "fraud" else 0.0) for x in labels
    }
    repository = running_stack.model_repository
    logged = logged_rows(store, request_ids=list(served))
    scorers: dict[str, Any] = {}

    def scorer_of(row: dict[str, Any]) -> Any:
        if row["model_version"] not in scorers:
            scorers[row["model_version"]] = served_scorer(
                row["model_version"],
                row["model_name"],
                lambda m, v: Path(repository) / m / v,
                live_settings.postprocess.blend_weights,
            )
        return scorers[row["model_version"]]

    report = replay(logged, scorer_of)
    assert report["summary"]["rows"] == 30
    assert report["summary"]["max_abs_delta"] <= 1e-5
    assert report["summary"]["agreement"] == 1.0
    # the same through the version loaded in Triton
    client = grpcclient.InferenceServerClient(running_stack.triton_ports.grpc_url)
    via_triton = served_scorer(
        "1", "fraud_xgb", lambda m, v: Path(repository) / m / v, {}, triton_runner(client)
    )
    again = replay(logged, lambda _row: via_triton)
    client.close()
    assert again["summary"]["max_abs_delta"] <= 1e-5


def test_replay_finds_a_version_only_the_registry_keeps(
    running_stack: StackState, stack_settings: Settings, tmp_path: Path
) -> None:
    assert running_stack.mlflow_uri is not None
    served = Path(running_stack.model_repository) / "fraud_xgb" / "1"
    # a name the deployer does not manage: registering it deploys nothing
    registered = register_version(running_stack.mlflow_uri, served, "replay_registry_probe")
    settings = stack_settings.model_copy(deep=True)
    settings.triton.model_repository = tmp_path  # the version is gone from the repository
    locate = artifact_locator(settings)
    found = locate("replay_registry_probe", registered.version)
    assert found is not None
    assert (found / "model.onnx").read_bytes() == (served / "model.onnx").read_bytes()
    assert locate("replay_registry_probe", "999") is None
