"""The load generators of the gateway benchmark and summaries of their per-request results.

* vegeta (open loop at a constant rate; ``rate=0`` with a worker cap is closed loop) against
  the gateway's HTTP API, with one JSON target per request of the fixed request file;
* perf_analyzer (gRPC) against the same Triton ensemble directly, with
  ``--profile-export-file`` so that both sides' percentiles (p99.9 included) come from
  per-request latencies, not from each tool's own rounding.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gateway.schemas import DEGRADED_HEADER
from python_backend.contract import CONTEXT_FEATURES

VEGETA_MODULE = "github.com/tsenart/vegeta/v12@v12.13.0"
CACHE_BIN = Path.home() / ".cache" / "rtinfer" / "bin"
VENV_BIN = Path(sys.prefix) / "bin"


def ensure_vegeta() -> Path:
    """The cached vegeta binary; built with ``go install`` on first use."""
    binary = CACHE_BIN / "vegeta"
    if binary.exists():
        return binary
    go = shutil.which("go") or "/usr/local/go/bin/go"
    CACHE_BIN.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [go, "install", VEGETA_MODULE], env={**os.environ, "GOBIN": str(CACHE_BIN)}, check=True
    )
    return binary


def predict_body(row: dict[str, Any]) -> dict[str, Any]:
    """The ``POST /predict/{model}`` body of one row of perf_analyzer's input file."""
    return {
        "entity_ids": {
            "user_id": row["user_id"]["content"][0],
            "merchant_id": row["merchant_id"]["content"][0],
        },
        "context": dict(zip(CONTEXT_FEATURES, row["context"]["content"], strict=True)),
    }


def write_targets(
    input_data: Path, url: str, api_key: str | None, out: Path, model: str = "fraud_xgb"
) -> int:
    """vegeta JSON targets: one ``POST /predict/{model}`` per row of perf_analyzer's file.

    Same users, merchants and context as the Triton-direct requests, in the same order.
    """
    rows = json.loads(input_data.read_text())["data"]
    header = {"Content-Type": ["application/json"]}
    if api_key is not None:
        header["X-API-Key"] = [api_key]
    with out.open("w") as f:
        for row in rows:
            body = predict_body(row)
            target = {
                "method": "POST",
                "url": f"{url}/predict/{model}",
                "body": base64.b64encode(json.dumps(body).encode()).decode(),
                "header": header,
            }
            f.write(json.dumps(target) + "\n")
    return len(rows)


def write_get_target(url: str, out: Path) -> None:
    out.write_text(json.dumps({"method": "GET", "url": url}) + "\n")


def vegeta_attack(
    vegeta: Path,
    targets: Path,
    rate: int,
    duration_s: float,
    out: Path,
    max_workers: int | None = None,
    timeout_s: float = 5.0,
) -> list[str]:
    """Run one attack into ``out`` (vegeta's binary results); return the command line.

    ``rate > 0``: open loop, vegeta adds workers (no cap) whenever the schedule needs one, so
    a slow server cannot slow the sender down. ``rate == 0``: closed loop with
    ``max_workers`` requests in flight.
    """
    cmd = [
        str(vegeta),
        "attack",
        "-format=json",
        f"-targets={targets}",
        f"-rate={rate}/s" if rate else "-rate=0",
        f"-duration={duration_s}s",
        f"-timeout={timeout_s}s",
        "-max-body=0",  # the degraded flag is a header; bodies would only fill the disk
        f"-output={out}",
    ]
    if max_workers is not None:
        cmd += [f"-workers={max_workers}", f"-max-workers={max_workers}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return cmd


def vegeta_summary(vegeta: Path, results: Path, rate: int) -> dict[str, Any]:
    """Percentiles, achieved rates and error counts of one attack."""
    encoded = subprocess.run(
        [str(vegeta), "encode", "--to", "json", str(results)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    sent, lat, seq, ok, degraded = [], [], [], 0, 0
    errors: dict[str, int] = {}
    for line in encoded.splitlines():
        r = json.loads(line)
        sent.append(np.datetime64(r["timestamp"].rstrip("Z"), "ns").astype(np.int64))
        lat.append(r["latency"])
        seq.append(r["seq"])
        is_degraded = DEGRADED_HEADER in (r.get("headers") or {})
        degraded += is_degraded
        if r["code"] == 200 and not r["error"]:
            ok += not is_degraded
        else:
            key = str(r["code"]) if r["code"] else _error_kind(r["error"])
            errors[key] = errors.get(key, 0) + 1
    t = np.asarray(sent)
    latency = np.asarray(lat, dtype=np.float64)
    order = np.argsort(seq)
    lag_ms = 0.0
    if rate and len(t) > 1:  # how late vegeta sent against its constant-rate schedule
        intended = t[order][0] + np.asarray(seq)[order] * (1e9 / rate)
        lag_ms = float(np.percentile(t[order] - intended, 99)) / 1e6
    return _summary(t, latency, ok, degraded, errors) | {"send_lag_p99_ms": round(lag_ms, 2)}


def _error_kind(error: str) -> str:
    if "deadline exceeded" in error or "Timeout" in error:
        return "client timeout"
    if "connection refused" in error:
        return "connection refused"
    return error[-60:] or "no response"


def _summary(
    sent_ns: np.ndarray,
    latency_ns: np.ndarray,
    ok: int,
    degraded: int,
    errors: dict[str, int],
    window_ns: tuple[int, int] | None = None,
) -> dict[str, Any]:
    n = len(sent_ns)
    if n == 0:
        return {"requests": 0}
    first, last = window_ns or (int(sent_ns.min()), int(sent_ns.max()))
    send_span = max(last - first, 1) / 1e9
    done_span = max(int((sent_ns + latency_ns).max()) - first, 1) / 1e9
    q = np.percentile(latency_ns, [50, 90, 99, 99.9]) / 1e6
    return {
        "requests": n,
        "sent_per_s": round(n / send_span, 1),
        # answered without degradation, per second of the whole attack (incl. the tail)
        "ok_per_s": round(ok / (done_span if window_ns is None else send_span), 1),
        "ok_ratio": round(ok / n, 5),
        "degraded": degraded,
        "errors": errors,
        "p50_ms": round(float(q[0]), 2),
        "p90_ms": round(float(q[1]), 2),
        "p99_ms": round(float(q[2]), 2),
        "p99_9_ms": round(float(q[3]), 2),
        "max_ms": round(float(latency_ns.max()) / 1e6, 2),
    }


def perf_env() -> dict[str, str]:
    env = dict(os.environ)
    libs = Path(sys.prefix) / "lib" / "perf_analyzer_libs"
    env["LD_LIBRARY_PATH"] = f"{libs}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
    return env


def perf_analyzer(
    model: str,
    grpc_url: str,
    input_data: Path,
    duration_s: float,
    out_prefix: Path,
    *,
    rate: int | None = None,
    concurrency: int | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """One perf_analyzer measurement (3 windows of ``duration_s / 3``): command, summary."""
    export = out_prefix.with_suffix(".export.json")
    cmd = [
        str(VENV_BIN / "perf_analyzer"),
        "-m",
        model,
        "-i",
        "grpc",
        "-u",
        grpc_url,
        "--input-data",
        str(input_data),
        "--measurement-interval",
        str(int(duration_s * 1000 / 3)),
        # exactly three windows: a stability criterion would stretch runs on this noisy box
        "--stability-percentage",
        "999",
        "--max-trials",
        "3",
        "--percentile",
        "99",
        "-f",
        str(out_prefix.with_suffix(".csv")),
        "--profile-export-file",
        str(export),
    ]
    if rate is not None:
        cmd += ["--request-rate-range", str(rate), "--max-threads", "16"]
    else:
        cmd += ["--concurrency-range", str(concurrency)]
    with out_prefix.with_suffix(".log").open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=perf_env())
    summary: dict[str, Any] = {"exit_code": proc.returncode}
    if export.exists():
        summary |= perf_export_summary(export)
        export.unlink()  # tens of MB (every response's features); the summary is kept
    csv_path = out_prefix.with_suffix(".csv")
    if csv_path.exists():
        with csv_path.open() as f:
            rows = list(csv.DictReader(f))
        if rows:
            summary["pa_infer_per_s"] = round(float(rows[-1]["Inferences/Second"]), 1)
    return cmd, summary


def perf_export_summary(export: Path) -> dict[str, Any]:
    """Per-request latencies of the measured windows of perf_analyzer's last experiment."""
    experiment = json.loads(export.read_text())["experiments"][-1]
    bounds = experiment["window_boundaries"]
    first, last = int(bounds[0]), int(bounds[-1])
    sent, lat, ok, degraded, failed = [], [], 0, 0, 0
    for r in experiment["requests"]:
        if not first <= r["timestamp"] < last:
            continue
        if not r["response_timestamps"]:
            failed += 1
            continue
        sent.append(r["timestamp"])
        lat.append(r["response_timestamps"][-1] - r["timestamp"])
        outputs = r.get("response_outputs") or [{}]
        if outputs[0].get("degraded"):
            degraded += 1
        else:
            ok += 1
    summary = _summary(
        np.asarray(sent, dtype=np.int64),
        np.asarray(lat, dtype=np.float64),
        ok,
        degraded,
        {"no response": failed} if failed else {},
        window_ns=(first, last),
    )
    summary["all_requests"] = len(experiment["requests"])
    if failed and sent:
        summary["requests"] += failed
        summary["ok_ratio"] = round(ok / summary["requests"], 5)
    return summary
