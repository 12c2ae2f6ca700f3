"""Bursty traffic through a pipeline with and without a queue policy on its entry model.

Reproduces the Triton 2.51 stall behind ``RTINFER_BATCHING__QUEUE_POLICY`` (docs/benchmarks.md,
"Queue policy stalls"): each round sends ``--burst`` concurrent requests to ``--pipeline``,
then idles ``--idle-s``; with any ``default_queue_policy`` on ``feature_assembler`` some burst
requests wait for the batcher's 500 ms timer. For each variant the script re-renders the
assembler's config of the running stack's repository, reloads it (bumping the version
directory so Triton reloads), measures, and finally restores the stack's own config.

    .venv/bin/rtinfer stack up
    .venv/bin/python perf_analyzer/queue_policy_stalls.py --rounds 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tritonclient.grpc as grpcclient

from gateway.repository.configs import assembler_config
from gateway.repository.layout import write_config
from gateway.settings import Settings
from python_backend.contract import ensemble_inputs
from python_backend.feature_spec import FEATURE_SPEC_FILE, FeatureSpec
from rtinfer.stack import StackState


def burst_latencies(url: str, pipeline: str, burst: int, rounds: int, idle_s: float) -> list[float]:
    client = grpcclient.InferenceServerClient(url)
    out: list[float] = []

    def one(i: int) -> float:
        inputs = ensemble_inputs(grpcclient, [f"u_{i % 20000:06d}"], ["m_00042"], [[1.0] * 10])
        started = time.perf_counter()
        client.infer(pipeline, inputs, client_timeout=5)
        return time.perf_counter() - started

    with ThreadPoolExecutor(burst) as pool:
        for r in range(rounds):
            out += pool.map(one, range(r * burst, (r + 1) * burst))
            time.sleep(idle_s)
    client.close()
    return out


def set_policy(repository: Path, settings: Settings, policy: str, url: str) -> None:
    batching = settings.batching.model_copy(update={"queue_policy": policy})
    spec = FeatureSpec.load(repository / "feature_assembler" / "1" / FEATURE_SPEC_FILE)
    config = assembler_config(spec, settings.model_copy(update={"batching": batching}))
    write_config(repository / "feature_assembler", config)
    os.utime(repository / "feature_assembler" / "1")  # Triton reloads only modified versions
    client = grpcclient.InferenceServerClient(url)
    client.load_model("feature_assembler")
    client.close()


def summarize(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "over_100ms": sum(x > 0.1 for x in ordered),
        "p50_ms": round(statistics.median(ordered) * 1e3, 2),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1e3, 2),
        "max_ms": round(ordered[-1] * 1e3, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="fraud_xgb_pipeline")
    parser.add_argument("--burst", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--idle-s", type=float, default=0.3)
    parser.add_argument("--variants", default="none,entry,none,entry")
    args = parser.parse_args()
    settings = Settings()
    state = StackState.load(settings.state_dir)
    if state is None:
        raise SystemExit("no running stack: start one with `rtinfer stack up`")
    settings = state.apply(settings)
    repository, url = Path(state.model_repository), state.triton_ports.grpc_url
    results = []
    try:
        for policy in args.variants.split(","):
            set_policy(repository, settings, policy, url)
            latencies = burst_latencies(url, args.pipeline, args.burst, args.rounds, args.idle_s)
            results.append({"queue_policy": policy, **summarize(latencies)})
            print(json.dumps(results[-1]))
    finally:
        set_policy(repository, settings, settings.batching.queue_policy, url)


if __name__ == "__main__":
    main()
