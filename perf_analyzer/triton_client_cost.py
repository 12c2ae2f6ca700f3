"""CPU cost of one Triton call from the gateway's own client, outside the HTTP stack.

Runs ``gateway.serving.triton_client.TritonClient.infer`` (``tritonclient.grpc.aio``) on uvloop, as
a gateway worker does, with a fixed number of calls in flight, and prints one JSON line per
concurrency: calls/s and this process's CPU time per call.

    .venv/bin/python perf_analyzer/triton_client_cost.py --url 127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import uvloop

from gateway.serving.triton_client import TritonClient

HERE = Path(__file__).resolve().parent


async def measure(url: str, endpoint: str, rows: list[dict], n: int, concurrency: int) -> dict:
    client = TritonClient(url)

    async def one(i: int) -> None:
        row = rows[i % len(rows)]
        await client.infer(
            endpoint,
            row["user_id"]["content"][0],
            row["merchant_id"]["content"][0],
            row["context"]["content"],
            request_id=str(i),
            timeout_s=2.0,
        )

    for i in range(50):  # channel up, caches warm
        await one(i)
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> None:
        async with gate:
            await one(i)

    wall0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(gated(i) for i in range(n)))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    await client.close()
    return {
        "concurrency": concurrency,
        "calls": n,
        "calls_per_s": round(n / wall),
        "client_cpu_us_per_call": round(cpu / n * 1e6),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", required=True, help="Triton gRPC host:port.")
    p.add_argument("--endpoint", default="fraud_xgb_pipeline")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--input-data", type=Path, default=HERE / "input_data.json")
    args = p.parse_args()
    rows = json.loads(args.input_data.read_text())["data"]
    for c in (int(v) for v in args.concurrency.split(",")):
        result = uvloop.run(measure(args.url, args.endpoint, rows, args.calls, c))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
