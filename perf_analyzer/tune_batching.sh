#!/usr/bin/env bash
# Quick A/B of batching settings on fraud_xgb_pipeline: restarts the local stack with the
# RTINFER_* variables you pass and measures each concurrency with perf_analyzer (gRPC).
#   RTINFER_BATCHING__MAX_QUEUE_DELAY_US=200 perf_analyzer/tune_batching.sh d200 8 16 32
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
label=$1; shift
.venv/bin/rtinfer stack down >/dev/null
.venv/bin/rtinfer stack up >/dev/null 2>&1
grpc="$(.venv/bin/python -c 'import json; s=json.load(open(".rtinfer/stack.json")); print(s["host"] + ":" + str(s["triton_grpc_port"]))')"
mkdir -p perf_analyzer/results/tuning
for c in "$@"; do
  log="perf_analyzer/results/tuning/${label}_c${c}.log"
  LD_LIBRARY_PATH=.venv/lib/perf_analyzer_libs .venv/bin/perf_analyzer -m fraud_xgb_pipeline \
    -i grpc -u "$grpc" --input-data perf_analyzer/input_data.json --measurement-interval 4000 \
    --stability-percentage 50 --max-trials 6 --percentile 99 --concurrency-range "$c" >"$log" 2>&1 || true
  echo "$label c=$c $(grep -m1 Throughput "$log" | awk '{print $2}') infer/s" \
       "p99 $(grep -m1 'p99 latency' "$log" | awk '{print $3/1000}') ms"
done
