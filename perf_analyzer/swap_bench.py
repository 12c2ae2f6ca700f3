"""Model swap benchmark: registration in MLflow -> serving, and the load's latency during swaps.

One run (about three minutes with the defaults):

1. a private stack with every service (``rtinfer.stack.up``: Redis, PostgreSQL, Kafka, MLflow,
   Triton, the gateway, an async worker, the deployer with its MLflow webhook) in
   ``--state-dir``, on free ports, serving a copy of ``model_repository/`` so the checkout is
   not changed, and an API key without rate limit;
2. a closed-loop load (``rtinfer.loadloop``: ``--concurrency`` requests in flight) on
   ``POST /predict/fraud_xgb`` through the gateway's HTTP port, for the whole run;
3. ``--steady-s`` seconds of steady state, then ``--swaps`` times: register a new version of
   fraud_xgb in MLflow (the champion's files, its metadata ``version`` bumped so the content
   differs), and time until the first answer served by it (webhook -> deployer -> swap ->
   catalog NOTIFY -> gateway), then until Triton has unloaded the old version after the drain
   (``--drain-s``); ``--gap-s`` of steady state between swaps.

Output: ``results.json`` and ``summary.md`` in ``perf_analyzer/results/<run-name>/``.

    .venv/bin/python perf_analyzer/swap_bench.py --run-name 2026-11-23-swap-a
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import psycopg

from gateway.auth.key_store import create_api_key
from gateway.catalog.dsn import dsn
from gateway.lifecycle.artifacts import copy_artifacts
from gateway.lifecycle.config import LifecycleSettings
from gateway.lifecycle.triton_repo import TritonRepository
from gateway.repository.layout import Serving
from gateway.settings import REPO_ROOT, Settings
from rtinfer import stack as stack_mod
from rtinfer.loadloop import LoadLoop, Sample, Summary, first_answer, flips_back
from rtinfer.registry import register_repository, register_version

HERE = Path(__file__).resolve().parent
MODEL = "fraud_xgb"


def bring_up(state_dir: Path, drain_s: float) -> tuple[Settings, stack_mod.StackState]:
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o755)
    repository = state_dir / "model_repository"
    if not repository.exists():
        shutil.copytree(
            REPO_ROOT / "model_repository",
            repository,
            ignore=shutil.ignore_patterns("__pycache__", "*__v*", "serving.json"),
        )
    settings = Settings(state_dir=state_dir)
    settings.triton.model_repository = repository
    settings.triton.http_port = settings.triton.grpc_port = settings.triton.metrics_port = 0
    settings.redis.port = settings.postgres.port = settings.mlflow.port = 0
    settings.kafka.port = settings.kafka.controller_port = 0
    settings.gateway.port = 0
    # registration promotes here (the default only shadows): the benchmark times that path
    settings.lifecycle = LifecycleSettings(drain_s=drain_s, deployer_port=0, on_register="promote")
    print(f"starting the stack in {state_dir} ...", file=sys.stderr)
    return settings, stack_mod.up(settings)


def candidate(repository: Path, out: Path, serial: int) -> Path:
    """The champion's files as a new candidate whose content (metadata version) differs."""
    champion = Serving.load(repository, MODEL).champion
    made = copy_artifacts(repository / MODEL / str(champion), out / f"candidate-{serial}")
    metadata = json.loads((made / "metadata.json").read_text())
    metadata["version"] = 1000 + serial
    (made / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return made


async def wait_for(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s:g}s")
        await asyncio.sleep(0.05)


async def run(args: argparse.Namespace, settings: Settings, state: stack_mod.StackState) -> dict:
    assert state.postgres is not None and state.gateway_url and state.mlflow_uri
    conninfo = dsn(settings.state_dir / "postgres", state.postgres.port).conninfo
    _, token = create_api_key(conninfo, f"swap-bench-{int(time.time())}")
    repository = settings.triton.model_repository
    # the served versions are MLflow's version 1, as after `rtinfer models register`
    await asyncio.to_thread(register_repository, state.mlflow_uri, repository)
    triton = TritonRepository(state.triton_ports.grpc_url)
    swaps: list[dict[str, Any]] = []
    windows: list[tuple[float, float]] = []
    work = Path(tempfile.mkdtemp(prefix="swap-bench-"))
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with (
        httpx.AsyncClient(
            base_url=state.gateway_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=10.0,
            limits=limits,
        ) as client,
        LoadLoop(client, MODEL, concurrency=args.concurrency) as load,
    ):
        await asyncio.sleep(args.warmup_s)
        steady_start = time.monotonic()
        await asyncio.sleep(args.steady_s)
        steady_end = time.monotonic()
        for i in range(args.swaps):
            old = Serving.load(repository, MODEL).champion
            source = candidate(repository, work, i)
            t0, t0_wall = time.monotonic(), time.time()
            registered = await asyncio.to_thread(register_version, state.mlflow_uri, source, MODEL)
            t_registered = time.monotonic()
            version = str(registered.version)
            if version == str(old):
                raise RuntimeError(f"MLflow registered the candidate as the served version {old}")

            async def served(version: str = version) -> bool:
                return first_answer(load.samples, version) is not None

            await wait_for(served, args.timeout_s, f"version {version} answering")
            first = first_answer(load.samples, version)
            assert first is not None

            async def retired(version: str = version) -> bool:
                return await triton.ready_versions(MODEL) == [int(version)]

            await wait_for(retired, args.timeout_s + args.drain_s, f"version {old} unloaded")
            t1 = time.monotonic()
            windows.append((t0, t1))
            steps = await asyncio.to_thread(history_steps, conninfo, version, t0_wall)
            during = load.between(t0, t1)
            swaps.append(
                {
                    "version": version,
                    "replaced": str(old),
                    "register_call_s": round(t_registered - t0, 2),
                    "registration_to_serving_s": round(first.finished - t0, 2),
                    "registration_to_unloaded_s": round(t1 - t0, 2),
                    **steps,
                    "load_during_swap": asdict(Summary.of(during)),
                    "answers_from_old_after_first_new": len(
                        flips_back(load.samples, str(old), version)
                    ),
                }
            )
            print(json.dumps(swaps[-1]), file=sys.stderr)
            await asyncio.sleep(args.gap_s)
    await triton.close()
    shutil.rmtree(work, ignore_errors=True)
    steady = load.between(steady_start, steady_end)
    in_swaps = [s for a, b in windows for s in load.between(a, b)]
    return {
        "steady": asdict(Summary.of(steady)),
        "during_swaps": asdict(Summary.of(in_swaps)),
        "all": asdict(Summary.of(load.samples)),
        "degraded_reasons": _reasons(load.samples),
        "swaps": swaps,
        "registration_to_serving_s_median": statistics.median(
            s["registration_to_serving_s"] for s in swaps
        ),
    }


def history_steps(conninfo: str, version: str, t0_wall: float) -> dict[str, Any]:
    """When the deployer started and switched ``version`` (seconds after registration), and
    its step timings, from the catalog history."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT action, extract(epoch FROM at), detail FROM model_deployment_history "
            "WHERE model_name = %s AND detail->>'version' = %s ORDER BY id",
            (MODEL, version),
        ).fetchall()
    out: dict[str, Any] = {}
    for action, at, detail in rows:
        if action == "deploy_started":
            out["registration_to_deploy_started_s"] = round(float(at) - t0_wall, 2)
            out["trigger"] = detail.get("trigger")
        elif action in ("promoted", "deploy_failed"):
            out[f"registration_to_{action}_s"] = round(float(at) - t0_wall, 2)
            out["swap_steps_ms"] = detail.get("timings_ms")
    return out


def _reasons(samples: list[Sample]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in samples:
        if s.degraded_reason:
            counts[s.degraded_reason] = counts.get(s.degraded_reason, 0) + 1
    return counts


def summary_md(results: dict[str, Any], args: argparse.Namespace) -> str:
    rows = [
        "| window | requests | non-2xx | degraded | p50 ms | p99 ms | req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("steady", "during_swaps", "all"):
        r = results[name]
        rows.append(
            f"| {name} | {r['requests']} | {r['non_2xx']} | {r['degraded']} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {r['per_s']} |"
        )
    rows += [
        "",
        "| swap | trigger | register call s | -> deploy started s | -> catalog switched s | "
        "-> first answer s | -> old unloaded s | swap steps ms | p99 ms during | "
        "old answers after first new |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results["swaps"]:
        rows.append(
            f"| {s['replaced']} -> {s['version']} | {s.get('trigger')} | "
            f"{s['register_call_s']} | {s.get('registration_to_deploy_started_s')} | "
            f"{s.get('registration_to_promoted_s')} | {s['registration_to_serving_s']} | "
            f"{s['registration_to_unloaded_s']} | {s.get('swap_steps_ms')} | "
            f"{s['load_during_swap']['p99_ms']} | {s['answers_from_old_after_first_new']} |"
        )
    rows.append("")
    rows.append(f"degraded reasons: {results['degraded_reasons'] or 'none'}")
    rows.append(f"settings: {vars(args)}")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-name", default=dt.date.today().isoformat() + "-swap")
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/rtinfer-swap-bench"))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--drain-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--steady-s", type=float, default=30.0)
    parser.add_argument("--gap-s", type=float, default=10.0)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--keep-stack", action="store_true", help="leave the stack running")
    args = parser.parse_args()
    out = HERE / "results" / args.run_name
    out.mkdir(parents=True, exist_ok=True)
    settings, state = bring_up(args.state_dir, args.drain_s)
    try:
        results = asyncio.run(run(args, settings, state))
    finally:
        if not args.keep_stack:
            stack_mod.down(settings)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_after": os.getloadavg(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = summary_md(results, args)
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
