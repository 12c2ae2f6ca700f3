"""CPU cost of one Triton call from the gateway, outside the HTTP stack, by transport.

On uvloop, as a gateway worker runs, with a fixed number of calls in flight; one JSON line per
transport and concurrency: calls/s and this process's CPU time per call. Transports:

* ``gateway``: ``gateway.serving.triton_client.TritonClient.infer`` (raw protobufs on
  ``grpc.aio``, coalescing, guard, metrics);
* ``tritonclient``: ``tritonclient.grpc.aio`` with its ``InferInput``/``InferResult`` wrappers
  (what the gateway used before);
* ``sync-thread``: the same raw protobuf on a synchronous gRPC stub in a thread pool.

    .venv/bin/python perf_analyzer/triton_client_cost.py --url 127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import time
from pathlib import Path
from typing import Any

import grpc
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import uvloop
from tritonclient.grpc import service_pb2_grpc

from gateway.serving.infer_proto import infer_request, results
from gateway.serving.triton_client import TritonClient
from python_backend.contract import LOGGED_BY_PROBE, OUTPUTS, ensemble_inputs

HERE = Path(__file__).resolve().parent


def _row(row: dict) -> tuple[str, str, list[float]]:
    return row["user_id"]["content"][0], row["merchant_id"]["content"][0], row["context"]["content"]


def caller(transport: str, url: str, endpoint: str, rows: list[dict], concurrency: int) -> Any:
    """An ``async one(i)`` making call ``i`` with ``transport``, and its ``close``."""
    if transport == "gateway":
        client = TritonClient(url)

        async def one(i: int) -> None:
            user, merchant, ctx = _row(rows[i % len(rows)])
            await client.infer(endpoint, user, merchant, ctx, request_id=str(i), timeout_s=2.0)

        return one, client.close
    if transport == "tritonclient":
        aio = grpcaio.InferenceServerClient(url)
        outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]

        async def one(i: int) -> None:
            user, merchant, ctx = _row(rows[i % len(rows)])
            inputs = ensemble_inputs(grpcclient, [user], [merchant], [ctx])
            result = await aio.infer(endpoint, inputs, outputs=outputs, request_id=str(i))
            [result.as_numpy(name) for name in OUTPUTS]

        return one, aio.close
    if transport == "sync-thread":
        channel = grpc.insecure_channel(url)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        pool = concurrent.futures.ThreadPoolExecutor(concurrency)

        def call(i: int) -> None:
            user, merchant, ctx = _row(rows[i % len(rows)])
            request = infer_request(
                endpoint, [user], [merchant], [ctx], request_id=str(i), timeout_us=2_000_000,
                logged_by=LOGGED_BY_PROBE,
            )  # fmt: skip
            results(stub.ModelInfer(request, timeout=2.0), 1)

        async def one(i: int) -> None:
            await asyncio.get_running_loop().run_in_executor(pool, call, i)

        async def close() -> None:
            pool.shutdown()
            channel.close()

        return one, close
    raise SystemExit(f"unknown transport {transport!r}")


async def measure(
    transport: str, url: str, endpoint: str, rows: list[dict], n: int, concurrency: int
) -> dict:
    one, close = caller(transport, url, endpoint, rows, concurrency)

    for i in range(50):  # channel up, caches warm
        await one(i)
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> None:
        async with gate:
            await one(i)

    wall0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(gated(i) for i in range(n)))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    await close()
    return {
        "transport": transport,
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
    p.add_argument("--transports", default="gateway,tritonclient,sync-thread")
    p.add_argument("--input-data", type=Path, default=HERE / "input_data.json")
    args = p.parse_args()
    rows = json.loads(args.input_data.read_text())["data"]
    for transport in args.transports.split(","):
        for c in (int(v) for v in args.concurrency.split(",")):
            result = uvloop.run(measure(transport, args.url, args.endpoint, rows, args.calls, c))
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
