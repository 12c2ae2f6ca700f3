"""Concurrency and request-rate sweeps of the fraud ensembles with Triton's perf_analyzer.

Runs against the stack started by ``rtinfer stack up`` (gRPC), writes one CSV per sweep under
``perf_analyzer/results/<run>/`` plus the server-side feature-store counters, and prints a
markdown table for ``docs/benchmarks.md``.

    .venv/bin/python perf_analyzer/run_sweep.py --models fraud_xgb_pipeline \
        --concurrency 1,2,4,8,16,32 --rates 500,1000,2000,3000
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_BIN = Path(sys.prefix) / "bin"


def make_input_data(path: Path, n: int, seed: int) -> None:
    """Fixed request file: real demo entity ids (distinct per request) + plausible context."""
    import numpy as np

    rng = np.random.default_rng(seed)
    data = []
    for i in range(n):
        ctx = [
            round(float(rng.lognormal(3.5, 1.0)), 2),  # amount
            int(rng.integers(0, 24)),
            int(rng.integers(0, 7)),
            int(rng.integers(0, 3)),
            int(rng.random() < 0.1),
            int(rng.random() < 0.4),
            int(rng.integers(0, 900)),
            round(float(rng.random()), 3),
            round(float(rng.exponential(40.0)), 1),
            int(rng.random() < 0.08),
        ]
        data.append(
            {
                "user_id": {"content": [f"u_{(i * 7919) % 20000 + 1:06d}"], "shape": [1]},
                "merchant_id": {"content": [f"m_{(i * 104729) % 2000 + 1:05d}"], "shape": [1]},
                "context": {"content": [float(v) for v in ctx], "shape": [10]},
            }
        )
    path.write_text(json.dumps({"data": data}) + "\n")


def perf_env() -> dict[str, str]:
    env = dict(os.environ)
    libs = Path(sys.prefix) / "lib" / "perf_analyzer_libs"
    env["LD_LIBRARY_PATH"] = f"{libs}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
    return env


def run_pa(args: list[str], log_path: Path) -> None:
    cmd = [str(VENV_BIN / "perf_analyzer"), *args]
    print("+", " ".join(cmd), file=sys.stderr)
    with log_path.open("w") as out:
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=perf_env(), check=True)


def sweep(
    model: str, common: list[str], flag: str, values: str, out_dir: Path, kind: str
) -> list[dict[str, str]]:
    """One perf_analyzer run per value (ranges are linear; we want e.g. 1,2,4,...,32)."""
    rows: list[dict[str, str]] = []
    for value in values.split(","):
        csv_path = out_dir / f"{model}_{kind}_{value}.csv"
        log_path = out_dir / f"{model}_{kind}_{value}.log"
        try:
            run_pa(["-m", model, *common, flag, value, "-f", str(csv_path)], log_path)
        except subprocess.CalledProcessError:
            # e.g. no stable measurement at saturation: keep the rest of the sweep
            print(
                f"perf_analyzer failed for {model} {kind}={value}; see {log_path}", file=sys.stderr
            )
            continue
        rows += read_csv(csv_path)
        csv_path.unlink()  # merged below
    merged = out_dir / f"{model}_{kind}.csv"
    if rows:
        with merged.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def metrics_snapshot(url: str) -> dict[str, float]:
    """Sum of each rtinfer_* / nv_inference_* series of interest (labels folded)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(
            r"^(rtinfer_[a-z_]+|nv_inference_exec_count|nv_inference_count)"
            r"(\{[^}]*\})?\s+([0-9.eE+-]+)$",
            line,
        )
        if not m:
            continue
        name, labels = m.group(1), m.group(2) or ""
        if name.startswith("nv_") and 'model="feature_assembler"' not in labels:
            continue
        out[name] = out.get(name, 0.0) + float(m.group(3))
    return out


def assembler_compute_quantiles(url: str) -> dict[str, float]:
    """feature_assembler compute-infer quantiles (us) from Triton's summary metrics."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("nv_inference_compute_infer_summary_us{") and (
            'model="feature_assembler"' in line
        ):
            q = re.search(r'quantile="([0-9.]+)"', line)
            if q:
                out[q.group(1)] = float(line.rsplit(" ", 1)[1])
    return out


def us_to_ms(v: str) -> float:
    return int(v) / 1000.0


def table_rows(rows: list[dict[str, str]], key: str) -> list[str]:
    out = []
    for r in rows:
        queue = us_to_ms(r["Server Queue"])
        compute = sum(
            us_to_ms(r[k])
            for k in ("Server Compute Input", "Server Compute Infer", "Server Compute Output")
        )
        out.append(
            f"| {r[key]} | {float(r['Inferences/Second']):,.0f} | {us_to_ms(r['p50 latency']):.2f}"
            f" | {us_to_ms(r['p99 latency']):.2f} | {queue:.2f} | {compute:.2f} |"
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="fraud_xgb_pipeline,fraud_nn_pipeline,fraud_blend_pipeline")
    p.add_argument("--concurrency", default="1,2,4,8,16,32")
    p.add_argument("--rates", default="500,1000,2000,3000")
    p.add_argument("--measurement-ms", type=int, default=5000)
    p.add_argument("--input-data", type=Path, default=HERE / "input_data.json")
    p.add_argument("--run-name", default=dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    p.add_argument("--state", type=Path, default=ROOT / ".rtinfer" / "stack.json")
    args = p.parse_args()

    if not args.input_data.exists():
        make_input_data(args.input_data, n=4096, seed=11)
    stack = json.loads(args.state.read_text())
    grpc_url = f"{stack['host']}:{stack['triton_grpc_port']}"
    metrics_url = f"http://{stack['host']}:{stack['triton_metrics_port']}/metrics"
    out_dir = HERE / "results" / args.run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    common = [
        "-i",
        "grpc",
        "-u",
        grpc_url,
        "--input-data",
        str(args.input_data),
        "--measurement-interval",
        str(args.measurement_ms),
        # this 2-core box is noisy: accept +-50% between windows, up to 10 windows
        "--stability-percentage",
        "50",
        "--max-trials",
        "10",
        "--percentile",
        "99",
    ]

    report = [
        f"Run `{args.run_name}` - {dt.date.today()} - {platform.node()}, {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}; gRPC; perf_analyzer on the same machine.",
        "",
        f"Command: `.venv/bin/python perf_analyzer/run_sweep.py --models {args.models} "
        f"--concurrency {args.concurrency} --rates {args.rates}`",
        "",
    ]
    for model in args.models.split(","):
        before = metrics_snapshot(metrics_url)
        conc_rows = sweep(
            model, common, "--concurrency-range", args.concurrency, out_dir, "concurrency"
        )
        rate_rows = (
            sweep(
                model,
                [*common, "--max-threads", "16"],
                "--request-rate-range",
                args.rates,
                out_dir,
                "rate",
            )
            if args.rates
            else []
        )
        after = metrics_snapshot(metrics_url)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        (out_dir / f"{model}_server_metrics.json").write_text(json.dumps(delta, indent=2))
        report += [
            f"### {model}",
            "",
            "Concurrency sweep:",
            "",
            "| concurrency | infer/s | p50 ms | p99 ms | server queue ms | server compute ms |",
            "|---|---|---|---|---|---|",
            *table_rows(conc_rows, "Concurrency"),
            "",
        ]
        if rate_rows:
            report += [
                "Request-rate sweep (open loop):",
                "",
                "| target req/s | achieved infer/s | p50 ms | p99 ms | server queue ms |"
                " server compute ms |",
                "|---|---|---|---|---|---|",
                *table_rows(rate_rows, "Request Rate"),
                "",
            ]
        execs = delta.get("nv_inference_exec_count", 0.0)
        infers = delta.get("nv_inference_count", 0.0)
        rts = delta.get("rtinfer_feature_store_round_trips_total", 0.0)
        quantiles = assembler_compute_quantiles(metrics_url)
        if quantiles:
            report += [
                "feature_assembler compute (per batch, Triton summary over the last minutes): "
                + ", ".join(
                    f"p{float(q) * 100:g} {v / 1000:.2f} ms" for q, v in sorted(quantiles.items())
                ),
                "",
            ]
        if execs:
            report += [
                f"feature_assembler: {infers:,.0f} rows in {execs:,.0f} batches "
                f"(mean batch {infers / execs:.1f}); Redis round trips {rts:,.0f} "
                f"= {rts / execs:.2f} per batch.",
                "",
            ]
    text = "\n".join(report)
    (out_dir / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
