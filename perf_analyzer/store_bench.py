"""The prediction store on the running stack: sink throughput, time to queryable, show latency.

    .venv/bin/python perf_analyzer/store_bench.py [--records 200000] [--rate 100 --seconds 20]

1. **sink**: with sink-0 stopped, ``--records`` full-size records (50 features, the gateway's
   fields) are produced to ``predictions``; the sink is started and the store polled every
   50 ms. Throughput = rows stored between the first and the last poll that saw new rows,
   divided by that time (sink start-up excluded; also printed including it).
2. **e2e**: ``--rate`` predictions per second through the gateway for ``--seconds``; a poller
   queries the store every 50 ms and notes when each request id first appears. Time to
   queryable = first seen - response received (50 ms resolution).
3. **show**: ``GET /predictions/{id}`` on the gateway and ``queries.show`` through the store
   client, sequentially, 200 times each; p50/p99.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid

import httpx
import orjson
import psycopg
from confluent_kafka import Producer

from gateway.auth.key_store import create_api_key
from gateway.catalog.dsn import dsn
from gateway.settings import Settings
from gateway.store import queries
from gateway.store.backend import open_store, rows
from rtinfer.loadloop import percentile
from rtinfer.stack import StackState
from rtinfer.supervisor import Supervisor


def record(tag: str, i: int) -> bytes:
    return orjson.dumps(
        {
            "schema_version": 1,
            "request_id": f"{tag}-{i}",
            "timestamp": time.time(),
            "model_name": f"bench_{tag}",
            "model_version": "1",
            "deployment_id": 1,
            "arm": "prod",
            "serving_endpoint": "fraud_xgb_pipeline",
            "door": "gateway",
            "entity_ids": {"user_id": f"u_{i % 20000:06d}", "merchant_id": f"m_{i % 2000:05d}"},
            "context": {"amount": 12.5, "hour_of_day": 3, "ip_risk_score": 0.7},
            "feature_overrides": {},
            "features": [0.123456 * (j + i % 7) for j in range(50)],
            "feature_hash": "0" * 64,
            "prediction": 0.0421,
            "label": "legit",
            "confidence": 0.9579,
            "degraded": False,
            "degraded_reason": "",
            "latency_ms": 3.2,
            "stage_latency_ms": {"route": 0.01, "infer": 2.9, "log": 0.02},
        }
    )


def sink_throughput(settings: Settings, state: StackState, n: int) -> None:
    store = open_store(settings.store_url())
    supervisor = Supervisor(settings.state_dir)
    supervisor.stop("sink-0")
    tag = uuid.uuid4().hex[:8]
    producer = Producer(
        {
            "bootstrap.servers": state.kafka_bootstrap,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
        }
    )
    for i in range(n):
        while True:
            try:
                producer.produce("predictions", record(tag, i), f"{tag}-{i}".encode())
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(60) == 0
    count = "SELECT count() AS n FROM predictions WHERE model_name = {m:String}"
    started = time.monotonic()
    supervisor.start_program("sink-0")
    first = last = None
    seen = 0
    while seen < n:
        now = time.monotonic()
        got = rows(store, count, {"m": f"bench_{tag}"})[0]["n"]
        if got > seen:
            if first is None:
                first = (now, got)
            last, seen = now, got
        time.sleep(0.05)
    assert first is not None and last is not None
    rate = (n - first[1]) / (last - first[0])
    print(
        f"sink: {n} records stored in {last - started:.2f}s from sink start "
        f"({n / (last - started):,.0f} rec/s incl. start-up); "
        f"{rate:,.0f} rec/s between first and last insert"
    )
    store.close()


def api_key(settings: Settings, state: StackState) -> str:
    assert state.postgres is not None
    conninfo = dsn(settings.state_dir / "postgres", state.postgres.port).conninfo
    with psycopg.connect(conninfo, autocommit=True) as db:
        return create_api_key(db, f"store-bench-{uuid.uuid4().hex[:6]}", is_admin=True)[1]


def end_to_end(settings: Settings, state: StackState, rate: float, seconds: float) -> list[str]:
    store = open_store(settings.store_url())
    headers = {"Authorization": f"Bearer {api_key(settings, state)}"}
    tag = uuid.uuid4().hex[:8]
    served: dict[str, float] = {}
    seen: dict[str, float] = {}
    done = threading.Event()

    def poll() -> None:
        sql = "SELECT request_id FROM predictions WHERE startsWith(request_id, {t:String})"
        while not done.is_set() or len(seen) < len(served):
            found = rows(store, sql, {"t": f"e2e-{tag}"})
            now = time.monotonic()
            for r in found:
                seen.setdefault(r["request_id"], now)
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    body = {
        "entity_ids": {"user_id": "u_000314", "merchant_id": "m_00042"},
        "context": {"amount": 98.0, "hour_of_day": 3},
    }
    with httpx.Client(base_url=state.gateway_url, headers=headers, timeout=10) as client:
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            rid = f"e2e-{tag}-{i}"
            r = client.post("/predict/fraud_xgb", json={**body, "request_id": rid})
            r.raise_for_status()
            served[rid] = time.monotonic()
    done.set()
    poller.join(60)
    lags = [seen[rid] - t for rid, t in served.items()]
    print(
        f"e2e: {len(lags)} predictions at {rate:g}/s; time to queryable "
        f"p50 {statistics.median(lags):.3f}s p99 {percentile(lags, 0.99):.3f}s "
        f"max {max(lags):.3f}s"
    )
    store.close()
    return list(served)[:200]


def show_latency(settings: Settings, state: StackState, ids: list[str]) -> None:
    store = open_store(settings.store_url())
    headers = {"Authorization": f"Bearer {api_key(settings, state)}"}
    direct, route = [], []
    with httpx.Client(base_url=state.gateway_url, headers=headers, timeout=10) as client:
        for rid in ids:
            t = time.perf_counter()
            assert queries.show(store, rid) is not None
            direct.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            client.get(f"/predictions/{rid}").raise_for_status()
            route.append((time.perf_counter() - t) * 1000)
    for name, ms in (("store client", direct), ("GET /predictions/{id}", route)):
        print(
            f"show via {name}: p50 {statistics.median(ms):.1f} ms p99 "
            f"{percentile(ms, 0.99):.1f} ms ({len(ms)} sequential)"
        )
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    base = Settings()
    state = StackState.load(base.state_dir)
    assert state is not None and state.sinks, "start the stack first: rtinfer stack up"
    settings = state.apply(base)
    sink_throughput(settings, state, args.records)
    ids = end_to_end(settings, state, args.rate, args.seconds)
    show_latency(settings, state, ids)


if __name__ == "__main__":
    main()
