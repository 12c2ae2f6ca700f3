"""The prediction log against a real KRaft broker, including a broker outage and restart."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka_broker import Broker, running_broker_with_topics
from kafka_reader import consume_all

from python_backend.predlog.writer import KafkaPredictionLog

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    yield from running_broker_with_topics(tmp_path_factory)


@pytest.fixture()
def running_broker(broker: Broker) -> Iterator[Broker]:
    """The broker, restarted after the test if the test stopped it."""
    yield broker
    broker.ensure_running()


def make_record(request_id: str, i: int, arm: str = "prod") -> dict[str, Any]:
    rng = random.Random(request_id)
    prediction = rng.random()
    degraded = i % 10 == 0
    return {
        "request_id": request_id,
        "timestamp": time.time(),
        "model_name": "fraud_xgb",
        "model_version": "3",
        "deployment_id": "fraud-scoring-2024-06",
        "arm": arm,
        "serving_endpoint": "fraud-scoring",
        "entity_ids": {"user_id": f"u_{i:06d}", "merchant_id": f"m_{i % 100:05d}"},
        "context": {"amount": 12.5 + i, "hour_of_day": i % 24, "channel": 1.0},
        "features": [rng.uniform(-5.0, 5.0) for _ in range(50)],
        "prediction": prediction,
        "label": "fraud" if prediction >= 0.5 else "legit",
        "confidence": max(prediction, 1.0 - prediction),
        "degraded": degraded,
        "degraded_reason": "feature_store_unavailable:fraud_context_lr" if degraded else "",
        "latency_ms": 3.25,
        "stage_latency_ms": {"route": 0.04, "infer": 2.9, "postprocess": 0.1, "log": 0.03},
    }


def expected_message(record: dict[str, Any]) -> dict[str, Any]:
    packed = struct.pack(f"<{len(record['features'])}f", *record["features"])
    return {**record, "schema_version": 1, "feature_hash": hashlib.sha256(packed).hexdigest()}


def request_ids(values: list[dict[str, Any]], prefix: str) -> Counter[str]:
    return Counter(v["request_id"] for v in values if v["request_id"].startswith(prefix))


def wait_for_stat(
    plog: KafkaPredictionLog, name: str, value: int, timeout_s: float
) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while (stats := plog.stats())[name] != value:
        assert time.monotonic() < deadline, f"{name} != {value} after {timeout_s:.0f}s: {stats}"
        time.sleep(0.05)
    return stats


def test_every_record_is_delivered_once_with_all_fields(broker: Broker, tmp_path: Path) -> None:
    records = [make_record(f"once-{i:04d}", i) for i in range(200)]
    plog = KafkaPredictionLog(broker.bootstrap, spool_dir=tmp_path / "spool")
    try:
        for record in records:
            plog.log(record)
        wait_for_stat(plog, "delivered", 200, timeout_s=30)
    finally:
        plog.close(timeout_s=10)
    stats = plog.stats()
    counts = {k: stats[k] for k in ("produced", "failed", "spooled", "dropped")}
    assert counts == {"produced": 200, "failed": 0, "spooled": 0, "dropped": 0}

    values = consume_all(broker.bootstrap, "predictions")
    assert request_ids(values, "once-") == Counter(r["request_id"] for r in records)
    by_id = {v["request_id"]: v for v in values}
    for record in records:
        assert by_id[record["request_id"]] == expected_message(record)


def test_shadow_records_go_to_the_shadow_topic(broker: Broker, tmp_path: Path) -> None:
    prod = [make_record(f"arm-p-{i:03d}", i) for i in range(10)]
    shadow = [
        {
            **make_record(f"arm-s-{i:03d}", i, arm="shadow"),
            "model_name": "fraud_nn",
            "shadow_of": p["request_id"],
            "production_prediction": p["prediction"],
        }
        for i, p in enumerate(prod)
    ]
    plog = KafkaPredictionLog(broker.bootstrap, spool_dir=tmp_path / "spool")
    try:
        for p, s in zip(prod, shadow, strict=True):
            plog.log(p)
            plog.log(s)
        wait_for_stat(plog, "delivered", 20, timeout_s=30)
    finally:
        plog.close(timeout_s=10)

    main = consume_all(broker.bootstrap, "predictions")
    side = consume_all(broker.bootstrap, "predictions-shadow")
    assert request_ids(main, "arm-") == Counter(r["request_id"] for r in prod)
    assert request_ids(side, "arm-") == Counter(r["request_id"] for r in shadow)
    by_id = {v["request_id"]: v for v in side}
    for record in shadow:
        assert by_id[record["request_id"]] == expected_message(record)


def test_numpy_values_nan_and_bad_records(broker: Broker, tmp_path: Path) -> None:
    """Triton hands back numpy values; NaN is not JSON; a broken record must not raise."""
    record = make_record("numpy-000", 0)
    features = np.asarray(record["features"], dtype=np.float32)
    record.update(
        features=features,
        prediction=np.float32(0.75),
        degraded=np.bool_(False),
        context={**record["context"], "ip_risk_score": float("nan")},
    )
    plog = KafkaPredictionLog(broker.bootstrap, spool_dir=tmp_path / "spool")
    try:
        plog.log({"request_id": "numpy-001", "unserializable": object()})
        plog.log(record)
        stats = wait_for_stat(plog, "delivered", 1, timeout_s=30)
    finally:
        plog.close(timeout_s=10)
    assert (stats["produced"], stats["dropped"]) == (1, 1)

    [got] = [
        v for v in consume_all(broker.bootstrap, "predictions") if v["request_id"] == "numpy-000"
    ]
    # float32 values may be written in their shortest float32 form: compare as float32
    assert np.array_equal(np.asarray(got["features"], dtype=np.float32), features)
    assert got["feature_hash"] == hashlib.sha256(features.astype("<f4").tobytes()).hexdigest()
    assert (got["prediction"], got["degraded"]) == (0.75, False)
    assert got["context"]["ip_risk_score"] is None


def test_outage_spools_records_and_replays_them_after_restart(
    running_broker: Broker, tmp_path: Path
) -> None:
    broker = running_broker
    plog = KafkaPredictionLog(
        broker.bootstrap,
        spool_dir=tmp_path / "spool",
        message_timeout_s=3.0,  # fail over to the spool quickly
        max_queued_messages=100,  # the rest hit a full queue and go to the spool directly
        replay_interval_s=0.2,
    )
    try:
        plog.log(make_record("outage-warmup", 0))  # connected, producer id assigned
        wait_for_stat(plog, "delivered", 1, timeout_s=30)

        broker.stop()
        records = [make_record(f"outage-{i:04d}", i) for i in range(300)]
        durations = []
        for record in records:
            started = time.perf_counter()
            plog.log(record)
            durations.append(time.perf_counter() - started)
        mean_ms, max_ms = 1000 * sum(durations) / len(durations), 1000 * max(durations)
        log.info("log() with the broker down: mean %.3f ms, max %.3f ms", mean_ms, max_ms)
        assert mean_ms < 5.0, "log() must not wait for Kafka"

        stats = wait_for_stat(plog, "spooled", 300, timeout_s=20)
        assert (stats["failed"], stats["spool_depth"], stats["delivered"]) == (300, 300, 1)

        broker.start()
        started = time.monotonic()
        stats = wait_for_stat(plog, "spool_depth", 0, timeout_s=60)
        log.info("replayed the spool in %.1fs after the restart", time.monotonic() - started)
    finally:
        plog.close(timeout_s=10)
    assert stats["replayed"] >= 300
    assert stats["dropped"] == 0

    counts = request_ids(consume_all(broker.bootstrap, "predictions"), "outage-")
    assert set(counts) == {r["request_id"] for r in records} | {"outage-warmup"}
    duplicates = sum(n - 1 for n in counts.values())
    log.info("outage replay: %d records, %d duplicates", len(records), duplicates)


def test_close_while_broker_down_spools_and_next_instance_replays(
    running_broker: Broker, tmp_path: Path
) -> None:
    broker = running_broker
    spool_dir = tmp_path / "spool"
    plog = KafkaPredictionLog(broker.bootstrap, spool_dir=spool_dir)  # 30 s message timeout
    try:
        plog.log(make_record("shutdown-warmup", 0))
        wait_for_stat(plog, "delivered", 1, timeout_s=30)
        broker.stop()
        records = [make_record(f"shutdown-{i:03d}", i) for i in range(50)]
        for record in records:
            plog.log(record)
    finally:
        started = time.monotonic()
        plog.close(timeout_s=2.0)
        closing_s = time.monotonic() - started
    assert closing_s < 8.0
    stats = plog.stats()
    assert (stats["spooled"], stats["spool_depth"], stats["dropped"]) == (50, 50, 0)

    broker.start()
    successor = KafkaPredictionLog(broker.bootstrap, spool_dir=spool_dir, replay_interval_s=0.2)
    try:
        assert successor.stats()["spool_depth"] == 50
        stats = wait_for_stat(successor, "spool_depth", 0, timeout_s=60)
    finally:
        successor.close(timeout_s=10)
    assert stats["replayed"] == 50

    counts = request_ids(consume_all(broker.bootstrap, "predictions"), "shutdown-")
    assert set(counts) == {r["request_id"] for r in records} | {"shutdown-warmup"}


_KILLED_WRITER = """
import json, sys, time
from python_backend.predlog.writer import KafkaPredictionLog
bootstrap, spool, prefix, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
plog = KafkaPredictionLog(bootstrap, spool_dir=spool, linger_ms=float(sys.argv[5]))
for i in range(n):
    plog.log({"request_id": f"{prefix}{i:04d}", "model_name": "fraud_xgb", "arm": "prod",
              "prediction": 0.5, "features": [0.0] * 50})
print(json.dumps(plog.stats()), flush=True)
time.sleep(600)  # killed before it can close (and flush or spool) anything
"""


def _logged_then_killed(
    broker: Broker, spool: Path, prefix: str, n: int, linger_ms: float
) -> dict[str, int]:
    """A process logs ``n`` records and is SIGKILLed right after; returns its last stats."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, broker.bootstrap, str(spool), prefix, str(n),
         str(linger_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        stats = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait(timeout=10)
    return stats  # type: ignore[no-any-return]


def test_records_in_flight_survive_a_kill_while_the_broker_is_down(
    running_broker: Broker, tmp_path: Path
) -> None:
    """kill -9 within the 30 s message timeout: nothing was spooled yet, the journal has it."""
    broker, spool = running_broker, tmp_path / "spool"
    broker.stop()
    stats = _logged_then_killed(broker, spool, "killed-down-", 200, linger_ms=5)
    assert (stats["produced"], stats["spooled"], stats["in_flight"]) == (200, 0, 200)
    broker.start()
    successor = KafkaPredictionLog(broker.bootstrap, spool_dir=spool, replay_interval_s=0.2)
    try:
        assert successor.stats()["recovered"] == 200
        stats = wait_for_stat(successor, "spool_depth", 0, timeout_s=60)
    finally:
        successor.close(timeout_s=10)
    assert (stats["replayed"], stats["dropped"]) == (200, 0)
    counts = request_ids(consume_all(broker.bootstrap, "predictions"), "killed-down-")
    assert set(counts) == {f"killed-down-{i:04d}" for i in range(200)}
    assert max(counts.values()) == 1  # nothing was delivered before the kill: exactly once


def test_records_lingering_in_memory_survive_a_kill_with_the_broker_up(
    running_broker: Broker, tmp_path: Path
) -> None:
    """kill -9 while records wait in librdkafka's linger: at least once, none lost."""
    broker, spool = running_broker, tmp_path / "spool"
    _logged_then_killed(broker, spool, "killed-up-", 300, linger_ms=1000)
    successor = KafkaPredictionLog(broker.bootstrap, spool_dir=spool, replay_interval_s=0.2)
    try:
        wait_for_stat(successor, "spool_depth", 0, timeout_s=60)
    finally:
        successor.close(timeout_s=10)
    counts = request_ids(consume_all(broker.bootstrap, "predictions"), "killed-up-")
    assert set(counts) == {f"killed-up-{i:04d}" for i in range(300)}
