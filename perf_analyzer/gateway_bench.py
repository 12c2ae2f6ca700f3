"""Gateway benchmark: open-loop load on ``POST /predict`` next to perf_analyzer on Triton.

One run, about eleven minutes on the 2-core development box:

1. a private local stack (``rtinfer stack up`` in ``--state-dir`` on free ports, or the one
   already there with ``--reuse-stack``) and an API key whose rate limit never refuses;
2. the gateway started as ``rtinfer stack up`` starts it (``start_gateway``: ``python -m
   gateway``, uvicorn workers, uvloop, httptools, orjson responses), with API-key auth and
   the Redis rate limit, the Kafka prediction log and one JSON log line per request;
3. for each ``--rates`` value, back to back: perf_analyzer at that constant rate on the
   ensemble directly (gRPC), then vegeta at that rate on ``POST /predict/<model>`` with the
   same requests (``perf_analyzer/input_data.json``);
4. the gateway's Triton client without HTTP (``triton_client_cost.py``), Triton closed loop
   with ``--closed-concurrency`` requests in flight, and ``GET /livez`` (closed loop and
   ``--livez-rates``) as the ceiling of the HTTP stack alone;
5. py-spy on the gateway workers at ``--profile-rate``;
6. the other ``--workers`` values: gateway sweep and ``/livez``;
7. one-worker ablations at ``--ablation-rate`` (prediction log, auth, log line switched off);
8. last, the gateway closed loop: it overloads the gateway, which may crash Triton 2.51
   (see ``TritonCrashed``).

Every step records the CPU used by Triton (with its python-backend stubs), the gateway,
Kafka, Redis, PostgreSQL, the load generator, and whatever else ran on the box. Output:
``results.json``, ``summary.md`` and the raw perf_analyzer/vegeta/py-spy files under
``perf_analyzer/results/<run-name>/``; ``docs/benchmarks.md`` explains the tables.

    .venv/bin/python perf_analyzer/gateway_bench.py --run-name 2026-11-23-gateway-b
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpu_account import CpuMeter, machine_busy_s, process_table, summarize_profile
from gateway_report import render
from loadgen import (
    ensure_vegeta,
    perf_analyzer,
    vegeta_attack,
    vegeta_summary,
    write_get_target,
    write_targets,
)

from gateway.auth.key_store import create_api_key
from gateway.catalog.dsn import dsn
from gateway.settings import Settings
from rtinfer import stack as stack_mod
from rtinfer.gateway_server import start_gateway
from rtinfer.procs import ManagedProcess, free_port, pid_alive

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROFILE_HZ = 100

#: gateway settings switched off one at a time (1 worker, --ablation-rate) to price each part
ABLATIONS: dict[str, dict[str, object]] = {
    "as deployed": {},
    "prediction log off (discard)": {"prediction_log": "discard"},
    "auth + rate limit off": {"auth": "none"},
    "per-request log line off (log_level=warning)": {"log_level": "warning"},
    "all three off": {"prediction_log": "discard", "auth": "none", "log_level": "warning"},
}


class TritonCrashed(RuntimeError):
    """tritonserver died during a step.

    Triton 2.51 (24.10, the pip wheel's) can segfault when many gRPC requests are cancelled
    by client deadlines (triton-inference-server/server#7368, fixed in 24.12 by #7840); an
    overloaded gateway cancels exactly such requests. The run stops and reports what it has.
    """


@dataclass
class Stack:
    state: stack_mod.StackState
    settings: Settings
    started_here: bool

    @property
    def grpc_url(self) -> str:
        return f"{self.state.host}:{self.state.triton_grpc_port}"

    def conninfo(self) -> str:
        pg = self.settings.postgres
        assert self.state.postgres is not None
        return dsn(
            self.settings.state_dir / "postgres",
            self.state.postgres.port,
            self.state.host,
            pg.user,
            pg.database,
        ).conninfo

    def process_groups(self) -> dict[str, int]:
        return {name: svc.pid for name, svc in self.state.services().items()}


def bring_up_stack(state_dir: Path, reuse: bool) -> Stack:
    settings = Settings(state_dir=state_dir, services=["redis", "postgres", "kafka", "triton"])
    if reuse:
        state = stack_mod.require_running(settings)
        return Stack(state, settings, started_here=False)
    settings.triton.http_port = settings.triton.grpc_port = settings.triton.metrics_port = 0
    settings.redis.port = settings.postgres.port = 0
    settings.kafka.port = settings.kafka.controller_port = 0
    print(f"starting the stack in {state_dir} ...", file=sys.stderr)
    return Stack(stack_mod.up(settings), settings, started_here=True)


class Gateway:
    """The gateway as ``rtinfer stack up`` starts it (``start_gateway``), on a free port."""

    def __init__(
        self, stack: Stack, workers: int, overrides: dict[str, object] | None = None
    ) -> None:
        self.workers = workers
        self.settings = stack.settings.model_copy(deep=True)
        state = stack.state
        assert state.postgres is not None and state.kafka is not None
        self.settings.redis.port = state.redis.port
        self.settings.postgres.port = state.postgres.port
        self.settings.kafka.port = state.kafka.port
        self.settings.gateway = self.settings.gateway.model_copy(
            update={
                "host": "127.0.0.1",
                "port": free_port(),
                "workers": workers,
                **(overrides or {}),
            }
        )
        self.url = f"http://127.0.0.1:{self.settings.gateway.port}"
        self.grpc_url = stack.grpc_url
        self.proc: ManagedProcess | None = None

    def start(self) -> None:
        self.proc = start_gateway(self.settings, self.grpc_url)

    def worker_pids(self) -> list[int]:
        """The processes serving requests (uvicorn's supervisor only watches them)."""
        assert self.proc is not None
        if self.workers == 1:
            return [self.proc.pid]
        table = process_table()
        return [
            pid
            for pid, (ppid, _) in table.items()
            if ppid == self.proc.pid and b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout_s=30)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Bench:
    def __init__(self, args: argparse.Namespace, stack: Stack, out_dir: Path) -> None:
        self.args = args
        self.stack = stack
        self.out_dir = out_dir
        self.vegeta = ensure_vegeta()
        self.records: list[dict[str, Any]] = []
        self.gateway: Gateway | None = None

    def meter(self) -> CpuMeter:
        groups = self.stack.process_groups()
        if self.gateway is not None and self.gateway.proc is not None:
            groups["gateway"] = self.gateway.proc.pid
        return CpuMeter(groups)

    def record(self, rec: dict[str, Any]) -> dict[str, Any]:
        s, cpu = rec["summary"], rec["cpu"]
        served = s.get("all_requests") or s.get("requests") or 0
        for group in ("gateway", "triton"):
            if served and group in cpu:
                rec[f"{group}_cpu_us_per_req"] = round(cpu[group] * cpu["wall_s"] / served * 1e6)
        self.records.append(rec)
        line = {k: s.get(k) for k in ("sent_per_s", "ok_per_s", "p50_ms", "p99_ms", "p99_9_ms")}
        print(f"{rec['name']}: {line} cpu={cpu}", file=sys.stderr)
        self.check_triton(rec["name"])
        time.sleep(self.args.pause_s)
        return rec

    def check_triton(self, step: str) -> None:
        if not pid_alive(self.stack.state.triton.pid):
            raise TritonCrashed(
                f"tritonserver (pid {self.stack.state.triton.pid}) died during step {step}; "
                f"see {self.stack.state.triton.log}"
            )

    # -- steps -------------------------------------------------------------------------------

    def triton_step(
        self, rep: int, rate: int | None = None, concurrency: int | None = None
    ) -> dict[str, Any]:
        name = f"triton_{'rate' if rate else 'c'}{rate or concurrency}_r{rep}"
        meter = self.meter()
        meter.start()
        loadavg_before = loadavg()
        cmd, summary = perf_analyzer(
            self.args.model_endpoint,
            self.stack.grpc_url,
            self.args.input_data,
            self.args.duration_s,
            self.out_dir / name,
            rate=rate,
            concurrency=concurrency,
        )
        cpu = meter.stop()
        return self.record(
            {
                "name": name,
                "kind": "triton",
                "mode": "rate" if rate else "closed",
                "rate": rate,
                "concurrency": concurrency,
                "rep": rep,
                "loadavg": loadavg_before,
                "command": cmd,
                "summary": summary,
                "cpu": cpu,
            }
        )

    def gateway_step(
        self,
        kind: str,
        targets: Path,
        rep: int,
        rate: int,
        concurrency: int | None = None,
        profile: bool = False,
        variant: str | None = None,
    ) -> dict[str, Any]:
        assert self.gateway is not None
        w = self.gateway.workers
        label = f"rate{rate}" if rate else f"c{concurrency}"
        suffix = "_profile" if profile else f"_v{list(ABLATIONS).index(variant)}" if variant else ""
        name = f"{kind}_w{w}_{label}{suffix}_r{rep}"
        results = self.out_dir / f"{name}.bin"
        spies: list[tuple[subprocess.Popen[bytes], Path]] = []
        if profile:
            for pid in self.gateway.worker_pids():
                path = self.out_dir / f"{name}.pyspy-{pid}.txt"
                spy = subprocess.Popen(
                    [
                        str(Path(sys.prefix) / "bin" / "py-spy"),
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(int(self.args.duration_s)),
                        "--rate",
                        str(PROFILE_HZ),
                        "--nonblocking",
                        "--gil",  # only samples holding the GIL: Python work, not waiting
                        "--format",
                        "raw",
                        "--output",
                        str(path),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                spies.append((spy, path))
        meter = self.meter()
        meter.start()
        loadavg_before = loadavg()
        cmd = vegeta_attack(
            self.vegeta, targets, rate, self.args.duration_s, results, max_workers=concurrency
        )
        for spy, _ in spies:
            spy.wait()
        cpu = meter.stop()
        summary = vegeta_summary(self.vegeta, results, rate)
        summary["all_requests"] = summary.get("requests", 0)
        report = subprocess.run(
            [str(self.vegeta), "report", "-type=json", str(results)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (self.out_dir / f"{name}.vegeta.json").write_text(report)
        results.unlink()  # binary, large; vegeta's report and our summary are kept
        rec = {
            "name": name,
            "kind": kind,
            "workers": w,
            "mode": "rate" if rate else "closed",
            "rate": rate or None,
            "concurrency": concurrency,
            "variant": variant,
            "rep": rep,
            "loadavg": loadavg_before,
            "command": cmd,
            "summary": summary,
            "cpu": cpu,
        }
        if spies:
            rec["profile"] = summarize_profile(
                [p for _, p in spies if p.exists()], PROFILE_HZ, self.args.duration_s
            )
        return self.record(rec)

    # -- the run -----------------------------------------------------------------------------

    def run(self, api_key: str) -> None:
        """Overload steps of the gateway come last: see ``TritonCrashed``."""
        a = self.args
        rates = [int(r) for r in a.rates.split(",")]
        workers_list = [int(w) for w in a.workers.split(",")]
        livez_rates = [int(r) for r in a.livez_rates.split(",") if r]
        for i, workers in enumerate(workers_list):
            with self.serving(workers, api_key) as (predict, livez):
                self.sweep(rates, predict, with_triton=i == 0)
                if i == 0:
                    self.client_cost_step()
                for rep in range(a.repeat):
                    if i == 0:
                        self.triton_step(rep, concurrency=a.closed_concurrency)
                    self.gateway_step("livez", livez, rep, 0, a.closed_concurrency)
                    for rate in livez_rates:
                        self.gateway_step("livez", livez, rep, rate)
                if i == 0 and a.profile_rate and shutil.which("py-spy", path=sys.prefix + "/bin"):
                    self.gateway_step("gateway", predict, 0, a.profile_rate, profile=True)
        if a.ablation_rate:
            for variant, overrides in ABLATIONS.items():
                with self.serving(1, api_key, overrides) as (predict, _):
                    for rep in range(a.repeat):
                        self.gateway_step(
                            "ablation", predict, rep, a.ablation_rate, variant=variant
                        )
        for workers in workers_list:
            with self.serving(workers, api_key) as (predict, _):
                for rep in range(a.repeat):
                    self.gateway_step("gateway", predict, rep, 0, a.closed_concurrency)

    def client_cost_step(self) -> None:
        """CPU per Triton call of the gateway's own gRPC client, without HTTP around it."""
        meter = self.meter()
        meter.start()
        loadavg_before = loadavg()
        cmd = [
            sys.executable,
            str(HERE / "triton_client_cost.py"),
            "--url",
            self.stack.grpc_url,
            "--endpoint",
            self.args.model_endpoint,
            "--concurrency",
            "1,8",
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        cpu = meter.stop()
        results = [json.loads(line) for line in out.splitlines() if line.strip()]
        self.records.append(
            {
                "name": "triton_client_cost",
                "kind": "client_cost",
                "mode": "closed",
                "loadavg": loadavg_before,
                "command": cmd,
                "results": results,
                "summary": {},
                "cpu": cpu,
            }
        )
        print(f"triton_client_cost: {results} cpu={cpu}", file=sys.stderr)
        time.sleep(self.args.pause_s)

    @contextmanager
    def serving(
        self, workers: int, api_key: str, overrides: dict[str, object] | None = None
    ) -> Iterator[tuple[Path, Path]]:
        """A started, warmed-up gateway; yields the /predict and /livez target files."""
        self.gateway = Gateway(self.stack, workers, overrides)
        self.gateway.start()
        try:
            predict = self.out_dir / "targets-predict.jsonl"
            write_targets(self.args.input_data, self.gateway.url, api_key, predict, self.args.model)
            livez = self.out_dir / "targets-livez.jsonl"
            write_get_target(f"{self.gateway.url}/livez", livez)
            # every worker verifies the key once (scrypt) and opens its channels
            warmup = self.out_dir / "warmup.bin"
            vegeta_attack(self.vegeta, predict, 200, 4, warmup)
            warmup.unlink()
            time.sleep(self.args.pause_s)
            yield predict, livez
        finally:
            self.gateway.stop()
            self.gateway = None

    def sweep(self, rates: list[int], predict: Path, with_triton: bool) -> None:
        """Rates in increasing order; a side stops after its first step far below its rate."""
        saturated = {"triton": not with_triton, "gateway": False}
        for rate in rates:
            for rep in range(self.args.repeat):
                if not saturated["triton"]:
                    rec = self.triton_step(rep, rate=rate)
                    saturated["triton"] = _far_below(rec, rate)
                if not saturated["gateway"]:
                    rec = self.gateway_step("gateway", predict, rep, rate)
                    saturated["gateway"] = _far_below(rec, rate)


def _far_below(rec: dict[str, Any], rate: int) -> bool:
    return bool(rec["summary"].get("ok_per_s", 0) < 0.6 * rate)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rates", default="100,150,200,300,400,500,600,800,1000,1200,1500,2000")
    p.add_argument("--workers", default="2,1", help="Gateway worker counts, first is profiled.")
    p.add_argument("--duration-s", type=float, default=10.0, help="Per step and side.")
    p.add_argument("--repeat", type=int, default=1, help="Measurements per step (medians).")
    p.add_argument("--closed-concurrency", type=int, default=32)
    p.add_argument("--livez-rates", default="1000,2000", help="Open-loop rates on /livez.")
    p.add_argument("--profile-rate", type=int, default=250, help="0: no py-spy step.")
    p.add_argument(
        "--ablation-rate", type=int, default=200, help="0: skip the one-worker ablations."
    )
    p.add_argument("--slo-p99-ms", type=float, default=100.0, help="'Sustained' p99 bound.")
    p.add_argument("--model", default="fraud_xgb", help="Catalog model behind /predict.")
    p.add_argument("--model-endpoint", default="fraud_xgb_pipeline", help="Its Triton ensemble.")
    p.add_argument("--input-data", type=Path, default=HERE / "input_data.json")
    p.add_argument("--state-dir", type=Path, default=Path("/tmp/rtinfer-bench"))
    p.add_argument("--reuse-stack", action="store_true", help="Use the stack in --state-dir.")
    p.add_argument("--keep-stack", action="store_true", help="Leave a stack started here up.")
    p.add_argument("--pause-s", type=float, default=2.0, help="Idle time after each step.")
    p.add_argument(
        "--wait-quiet-s",
        type=float,
        default=300.0,
        help="Wait up to this long for the box to be idle (< 0.5 busy cores) before starting.",
    )
    p.add_argument("--run-name", default=dt.datetime.now().strftime("%Y-%m-%d-gateway"))
    args = p.parse_args()

    out_dir = HERE / "results" / args.run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    busy_before = wait_for_quiet(args.wait_quiet_s)
    started = dt.datetime.now().astimezone()
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "loadavg_start": loadavg(),
        "busy_cores_before_start": busy_before,
    }
    stack = bring_up_stack(args.state_dir, args.reuse_stack)
    bench = Bench(args, stack, out_dir)
    try:
        _, token = create_api_key(stack.conninfo(), "gateway-bench", rate_limit_per_s=1e6)
        bench.run(token)
    except TritonCrashed as exc:
        print(f"stopping early: {exc}", file=sys.stderr)
        meta["aborted"] = str(exc)
        # its python-backend stubs outlive it, in the process group it led
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stack.state.triton.pid, signal.SIGKILL)
    finally:
        if bench.gateway is not None:
            bench.gateway.stop()
        if stack.started_here and not args.keep_stack:
            stack_mod.down(stack.settings)
        meta |= {
            "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_end": loadavg(),
            "machine": machine(),
            "command": " ".join(
                [".venv/bin/python", "perf_analyzer/gateway_bench.py", *sys.argv[1:]]
            ),
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        (out_dir / "results.json").write_text(
            json.dumps({"meta": meta, "steps": bench.records}, indent=1) + "\n"
        )
        for targets in out_dir.glob("targets-*.jsonl"):  # they hold the run's API key
            targets.unlink()
    text = render(meta, bench.records, args.slo_p99_ms)
    (out_dir / "summary.md").write_text(text)
    print(text)


def wait_for_quiet(max_wait_s: float, busy_cores: float = 0.5, window_s: float = 5.0) -> float:
    """Busy cores of the last window once below ``busy_cores`` (or when time is up)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = machine_busy_s()
        time.sleep(window_s)
        busy = round((machine_busy_s() - before) / window_s, 2)
        if busy < busy_cores or time.monotonic() >= deadline:
            return busy
        print(f"box busy ({busy} cores used by others); waiting", file=sys.stderr)


def machine() -> dict[str, Any]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "host": platform.node(),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "mem_gb": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    main()
