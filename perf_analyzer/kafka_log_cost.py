"""CPU cost of the prediction log per record: in the producer and in the Kafka broker.

Feeds ``python_backend.predlog.writer.KafkaPredictionLog`` (the gateway's class) a constant rate of
records shaped like the gateway's, for each ``--linger-ms`` value, against the Kafka broker
of a running local stack, and prints one JSON line per setting: CPU µs per record in this
process (``log()``, delivery callbacks, librdkafka threads) and in the broker.

    .venv/bin/python perf_analyzer/kafka_log_cost.py --state-dir /tmp/rtinfer-bench
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cpu_account import CpuMeter

from python_backend.predlog.writer import KafkaPredictionLog
from rtinfer.stack import StackState


def record(i: int) -> dict:
    """A record like ``PredictionService._finish`` builds."""
    return {
        "request_id": f"{i:032x}",
        "timestamp": time.time(),
        "model_name": "fraud_xgb",
        "model_version": "1",
        "deployment_id": 1,
        "arm": "prod",
        "serving_endpoint": "fraud_xgb_pipeline",
        "entity_ids": {"user_id": f"u_{i % 20000:06d}", "merchant_id": f"m_{i % 2000:05d}"},
        "context": {"amount": 42.5, "hour_of_day": 3.0, "is_new_device": 1.0},
        "feature_overrides": {},
        "features": [float(i % 97) + k / 7 for k in range(50)],
        "prediction": 0.0123,
        "label": "legit",
        "confidence": 0.9877,
        "degraded": False,
        "degraded_reason": None,
        "latency_ms": 7.25,
        "stage_latency_ms": {"route": 0.02, "infer": 6.9},
    }


def measure(bootstrap: str, kafka_pid: int, linger_ms: float, rate: int, duration_s: float):
    with tempfile.TemporaryDirectory() as spool:
        plog = KafkaPredictionLog(bootstrap, spool_dir=spool, linger_ms=linger_ms)
        for i in range(200):  # connected, idempotent producer id acquired
            plog.log(record(i))
        time.sleep(2.0)
        meter = CpuMeter({"kafka": kafka_pid})
        meter.start()
        cpu0 = time.process_time()
        start = time.monotonic()
        n = 0
        while (now := time.monotonic()) - start < duration_s:
            due = int((now - start) * rate)
            while n < due:
                plog.log(record(n))
                n += 1
            time.sleep(0.002)
        producer_cpu = time.process_time() - cpu0
        plog.close(10.0)  # deliveries of the window land in the broker's CPU too
        usage = meter.stop()
        stats = plog.stats()
    return {
        "linger_ms": linger_ms,
        "records": n,
        "rate": rate,
        "producer_cpu_us_per_record": round(producer_cpu / n * 1e6),
        "broker_cpu_us_per_record": round(usage["kafka"] * usage["wall_s"] / n * 1e6),
        "broker_cores": usage["kafka"],
        "delivered": stats["delivered"],
        "failed": stats["failed"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--state-dir", type=Path, required=True, help="State dir of the stack.")
    p.add_argument("--rate", type=int, default=300, help="Records per second.")
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--linger-ms", default="5,50", help="Values to compare (5 = the default).")
    args = p.parse_args()
    state = StackState.load(args.state_dir)
    if state is None or state.kafka is None:
        raise SystemExit(f"no stack with Kafka in {args.state_dir}")
    idle = CpuMeter({"kafka": state.kafka.pid})
    idle.start()
    time.sleep(5.0)
    print(json.dumps({"broker_idle_cores": idle.stop()["kafka"]}), flush=True)
    for linger in (float(v) for v in args.linger_ms.split(",")):
        result = measure(
            state.kafka_bootstrap or "", state.kafka.pid, linger, args.rate, args.duration_s
        )
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
