"""The doors side by side: Triton direct, the gateway and a hand-written baseline, with wrk.

Against the running stack (README command 1, or ``rtinfer stack up``), in one run: for each
concurrency, ``wrk -t2 --latency`` for ``--duration-s`` against

* Triton direct: ``POST /v2/models/fraud_xgb_pipeline/infer`` (KServe v2 JSON) on Triton's
  HTTP port;
* the gateway: ``POST /predict/fraud_xgb`` with an API key (auth, rate limit, canary routing
  and the Kafka prediction log all on), the stack's (1 worker, the default) and each of
  ``--gateways`` (default: ``gateway-2w=2``, 2 workers; ``name=1@<git ref>`` runs another
  commit beside this one for an A/B, see ``extra_gateways.py``);
* the baseline: ``perf_analyzer/baseline_service.py`` (FastAPI + redis.asyncio + xgboost, 2
  uvicorn workers), started here on a free port.

Every server gets the same ``--bodies`` requests (the first rows of ``input_data.json``: demo
entity ids and context), cycled. CPU seconds of each server's process tree over the requests
it answered give its CPU per request. The baseline is first checked against the gateway on
those bodies (largest difference of the served probability).

    .venv/bin/rtinfer stack up
    .venv/bin/python perf_analyzer/door_bench.py --concurrency 4,16,64 --duration-s 15
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from cpu_account import CpuMeter
from extra_gateways import GatewaySpec, extra_gateways
from loadgen import (
    ensure_vegeta,
    predict_body,
    vegeta_attack,
    vegeta_summary,
    write_targets,
)

from gateway.auth.key_store import create_api_key, revoke_api_key
from gateway.catalog.dsn import dsn
from gateway.settings import Settings
from rtinfer import stack as stack_mod
from rtinfer.procs import free_port

HERE = Path(__file__).parent
MODEL, PIPELINE = "fraud_xgb", "fraud_xgb_pipeline"


@dataclass(frozen=True)
class Cell:
    server: str
    concurrency: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms_per_request: float


def bodies(input_data: Path, n: int) -> tuple[list[dict], list[dict]]:
    """(gateway/baseline bodies, Triton v2 bodies) of the first ``n`` rows."""
    rows = json.loads(input_data.read_text())["data"][:n]
    rest, v2 = [], []
    for row in rows:
        user, merchant = row["user_id"]["content"][0], row["merchant_id"]["content"][0]
        ctx = [float(v) for v in row["context"]["content"]]
        rest.append(predict_body(row))
        v2.append(
            {
                "inputs": [
                    {"name": "user_id", "shape": [1, 1], "datatype": "BYTES", "data": [user]},
                    {
                        "name": "merchant_id",
                        "shape": [1, 1],
                        "datatype": "BYTES",
                        "data": [merchant],
                    },
                    {"name": "context", "shape": [1, 10], "datatype": "FP32", "data": ctx},
                ]
            }
        )
    return rest, v2


def lua_script(path: Path, url_path: str, payloads: list[dict], headers: dict[str, str]) -> None:
    """A wrk script cycling through ``payloads`` (each thread from its own offset)."""

    def quote(text: str) -> str:
        return "[==[" + text + "]==]"

    lines = ["local bodies = {"]
    lines += [f"  {quote(json.dumps(p, separators=(',', ':')))}," for p in payloads]
    lines += ["}", "local headers = {"]
    lines += [f"  [ {quote(k)} ] = {quote(v)}," for k, v in headers.items()]
    lines += [
        "}",
        "local i = 0",
        "setup = function(thread) thread:set('offset', math.random(#bodies)) end",
        "init = function() i = (offset or 0) end",
        "request = function()",
        "  i = i % #bodies + 1",
        f"  return wrk.format('POST', {quote(url_path)}, headers, bodies[i])",
        "end",
    ]
    path.write_text("\n".join(lines) + "\n")


_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(base_url: str, script: Path, concurrency: int, duration_s: float) -> dict:
    out = subprocess.run(
        [
            "wrk", "-t2", f"-c{concurrency}", f"-d{duration_s:g}s", "--latency",
            "--timeout", "5s", "-s", str(script), base_url,
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    latency = {p: float(v) * _UNITS[u] for p, v, u in _LATENCY.findall(out)}
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = int(non2xx.group(1)) if non2xx else 0
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    return {
        "requests": requests,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": latency["50"],
        "p99_ms": latency["99"],
        "errors": errors,
    }


def start_baseline(state: stack_mod.StackState, port: int, workers: int) -> subprocess.Popen:
    version = json.loads((Path(state.model_repository) / MODEL / "serving.json").read_text())
    version_dir = Path(state.model_repository) / MODEL / str(version["champion"])
    proc = subprocess.Popen(
        [
            sys.executable, str(HERE / "baseline_service.py"), "--version-dir", str(version_dir),
            "--redis-url", state.redis_url, "--port", str(port), "--workers", str(workers),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.post(f"http://127.0.0.1:{port}/predict/{MODEL}", content=b"{}", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the baseline service did not start within 60 s")


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(10)


def check_baseline(gateway: str, baseline: str, key: str, payloads: list[dict]) -> float:
    """Largest |gateway - baseline| served probability over ``payloads``."""
    worst = 0.0
    with httpx.Client(timeout=5) as client:
        for body in payloads:
            a = client.post(f"{gateway}/predict/{MODEL}", json=body, headers={"X-API-Key": key})
            b = client.post(f"{baseline}/predict/{MODEL}", json=body)
            a.raise_for_status()
            b.raise_for_status()
            if a.json().get("degraded"):
                continue
            worst = max(worst, abs(a.json()["prediction"] - b.json()["prediction"]))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="4,16,64")
    p.add_argument("--duration-s", type=float, default=15.0)
    p.add_argument("--bodies", type=int, default=2000)
    p.add_argument("--baseline-workers", type=int, default=2)
    p.add_argument("--servers", default="triton,gateway,gateway-2w,baseline")
    p.add_argument(
        "--gateways", default="gateway-2w=2", help="extra gateways: name=workers[:server][@git-ref]"
    )
    p.add_argument("--input-data", type=Path, default=HERE / "input_data.json")
    p.add_argument("--pause-s", type=float, default=2.0)
    p.add_argument(
        "--rates", default="", help="open loop: vegeta at these req/s against --open-servers"
    )
    p.add_argument("--open-servers", default="gateway,baseline")
    p.add_argument("--run-name", default=dt.datetime.now().strftime("%Y-%m-%d-doors"))
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")

    settings = Settings()
    state = stack_mod.require_running(settings)
    assert state.gateway is not None and state.postgres is not None
    pg = settings.postgres
    conninfo = dsn(
        settings.state_dir / "postgres", state.postgres.port, state.host, pg.user, pg.database
    ).conninfo
    api_key, key = create_api_key(conninfo, "door-bench", rate_limit_per_s=1e6)
    rest, v2 = bodies(args.input_data, args.bodies)
    out_dir = HERE / "results" / args.run_name
    out_dir.mkdir(parents=True, exist_ok=True)

    base_port = free_port()
    baseline = start_baseline(state, base_port, args.baseline_workers)
    gateway_url = f"http://{state.host}:{state.gateway.port}"
    baseline_url = f"http://127.0.0.1:{base_port}"
    servers = {
        "triton": (
            f"http://{state.host}:{state.triton_ports.http}",
            f"/v2/models/{PIPELINE}/infer",
            v2,
            {"Content-Type": "application/json"},
            stack_mod.service_pid(settings.state_dir, "triton"),
        ),
        "gateway": (
            gateway_url,
            f"/predict/{MODEL}",
            rest,
            {"Content-Type": "application/json", "X-API-Key": key},
            stack_mod.service_pid(settings.state_dir, "gateway"),
        ),
        "baseline": (
            baseline_url, f"/predict/{MODEL}", rest, {"Content-Type": "application/json"},
            baseline.pid,
        ),
    }  # fmt: skip
    cells: list[Cell] = []
    opened: list[dict] = []
    specs = [GatewaySpec.parse(x) for x in args.gateways.split(",") if x]
    wanted = args.servers.split(",")
    with ExitStack() as cleanup:
        cleanup.callback(revoke_api_key, conninfo, api_key.key_id)
        cleanup.callback(stop_process, baseline)
        scripts = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="door-bench-")))
        extras = cleanup.enter_context(
            extra_gateways([g for g in specs if g.name in wanted], state, scripts)
        )
        for name, started in extras.items():
            servers[name] = (
                started.url,
                f"/predict/{MODEL}",
                rest,
                servers["gateway"][3],
                started.pid,
            )
        worst = check_baseline(gateway_url, baseline_url, key, rest[:200])
        print(f"baseline vs gateway: largest probability difference {worst:.2e} (200 bodies)")
        for name in wanted:
            url, path, payloads, headers, pid = servers[name]
            script = scripts / f"{name}.lua"  # holds the API key: not kept
            lua_script(script, path, payloads, headers)
            for c in (int(x) for x in args.concurrency.split(",")):
                meter = CpuMeter({name: pid})
                meter.start()
                result = run_wrk(url, script, c, args.duration_s)
                used = meter.stop()
                cpu_ms = used[name] * used["wall_s"] * 1e3 / max(result["requests"], 1)
                cell = Cell(name, c, cpu_ms_per_request=round(cpu_ms, 3), **result)
                cells.append(cell)
                print(json.dumps(asdict(cell)), flush=True)
                time.sleep(args.pause_s)
        for name in (n for n in args.open_servers.split(",") if args.rates and n in servers):
            url, _, _, headers, _ = servers[name]
            for rate in (int(x) for x in args.rates.split(",")):
                point = open_loop(url, headers.get("X-API-Key"), args, rate, scripts)
                opened.append({"server": name, "rate": rate, **point})
                print(json.dumps(opened[-1]), flush=True)
                time.sleep(args.pause_s)
    (out_dir / "doors.json").write_text(json.dumps([asdict(c) for c in cells], indent=1))
    print(table(cells))
    if opened:
        (out_dir / "open_loop.json").write_text(json.dumps(opened, indent=1))
        print(open_table(opened))


def open_loop(url: str, key: str | None, args: argparse.Namespace, rate: int, tmp: Path) -> dict:
    """vegeta at ``rate`` req/s for ``--duration-s`` (open loop: a slow server cannot slow the
    sender), over the same requests as the closed loop."""
    vegeta = ensure_vegeta()
    targets, results = tmp / "targets.json", tmp / f"open-{rate}.bin"
    write_targets(args.input_data, url, key, targets)
    vegeta_attack(vegeta, targets, rate, args.duration_s, results)
    summary = vegeta_summary(vegeta, results, rate)
    keep = ("sent_per_s", "ok_per_s", "ok_ratio", "degraded", "p50_ms", "p99_ms", "send_lag_p99_ms")
    errors: dict[str, int] = {}
    for kind, n in summary["errors"].items():  # socket errors name the ports: group them
        kind = kind.rsplit(": ", 1)[-1] if "->" in kind else kind
        errors[kind] = errors.get(kind, 0) + n
    return {**{k: summary[k] for k in keep}, "errors": errors}


def open_table(points: list[dict]) -> str:
    lines = [
        "| server | rate req/s | ok/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for pt in points:
        lines.append(
            f"| {pt['server']} | {pt['rate']:,} | {pt['ok_per_s']:,.0f} | {pt['p50_ms']:.1f} | "
            f"{pt['p99_ms']:.1f} | {sum(pt['errors'].values())} |"
        )
    return "\n".join(lines)


def table(cells: list[Cell]) -> str:
    """req/s / p99 ms per server and concurrency, plus CPU ms per request."""
    conc = sorted({c.concurrency for c in cells})
    lines = [
        "| server | " + " | ".join(f"c={c}" for c in conc) + " | CPU ms/request |",
        "|---|" + "---|" * (len(conc) + 1),
    ]
    for server in dict.fromkeys(c.server for c in cells):
        row = {c.concurrency: c for c in cells if c.server == server}
        values = [f"{row[c].rps:,.0f} / {row[c].p99_ms:.1f}" for c in conc if c in row]
        cpu = "/".join(f"{row[c].cpu_ms_per_request:.2f}" for c in conc if c in row)
        lines.append(f"| {server} | " + " | ".join(values) + f" | {cpu} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
