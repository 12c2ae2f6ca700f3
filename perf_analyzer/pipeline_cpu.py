"""CPU milliseconds per inference of each server process during one perf_analyzer run.

Runs perf_analyzer (gRPC) against the running stack at one concurrency (``c16``) or request
rate (``400``), reads every process's CPU time from ``/proc`` before and after, and divides by
the inferences Triton counted for the model meanwhile: tritonserver, each python-backend stub,
Redis, Kafka and perf_analyzer itself. Extra arguments go to perf_analyzer, e.g.
``--request-parameter rtinfer_logged_by:probe:string`` (direct-client logging off).

    .venv/bin/python perf_analyzer/pipeline_cpu.py c16 fraud_xgb_pipeline
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from loadgen import perf_env

HERE = Path(__file__).resolve().parent
BIN = Path(sys.prefix) / "bin"


def cpu_by_process() -> dict[int, tuple[str, int]]:
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(pid)] = (cmd, int(fields[11]) + int(fields[12]))
    return out


def label(cmd: str) -> str:
    if "python_backend_stub" in cmd and "model_repository/" in cmd:
        return "stub:" + cmd.split("model_repository/")[1].split("/")[0]
    for needle, name in (("tritonserver", "tritonserver"), ("redis-server", "redis")):
        if needle in cmd:
            return name
    return "kafka" if "kafka" in cmd and "java" in cmd else cmd[:40]


def inferences(metrics_url: str, model: str) -> int:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    found = re.search(rf'nv_inference_count{{model="{model}",version="1"}} (\d+)', text)
    return int(found.group(1)) if found else 0


def main() -> None:
    load, model, *extra = sys.argv[1:] or ["c16", "fraud_xgb_pipeline"]
    metrics = "http://127.0.0.1:8002/metrics"
    cmd = [
        str(BIN / "perf_analyzer"), "-m", model, "-i", "grpc", "-u", "127.0.0.1:8001",
        "--input-data", str(HERE / "input_data.json"), "--measurement-interval", "8000",
        "--max-trials", "3", *extra,
    ]  # fmt: skip
    cmd += (
        ["--concurrency-range", load[1:]]
        if load.startswith("c")
        else ["--request-rate-range", load]
    )
    n0, before, started = inferences(metrics, model), cpu_by_process(), time.time()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=perf_env()
    )
    own = 0
    while proc.poll() is None:  # perf_analyzer's own CPU, read before it exits
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            own = int(fields[11]) + int(fields[12])
        except OSError:
            pass
        time.sleep(0.2)
    output = proc.stdout.read() if proc.stdout else ""
    after, n = cpu_by_process(), inferences(metrics, model) - n0
    hz = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {"perf_analyzer": own / hz}
    for pid, (command, ticks) in after.items():
        if pid in before and ticks > before[pid][1]:
            name = label(command)
            used[name] = used.get(name, 0.0) + (ticks - before[pid][1]) / hz
    rates = re.findall(r"[Tt]hroughput: ([\d.]+)", output)
    print(f"{model} {load} {' '.join(extra)}: {n} inferences in {time.time() - started:.0f} s, "
          f"last window {rates[-1] if rates else '?'} infer/s")  # fmt: skip
    server = 0.0
    for name, seconds in sorted(used.items(), key=lambda kv: -kv[1]):
        if seconds / max(n, 1) * 1e3 >= 0.005:
            print(f"  {name:40s} {seconds / max(n, 1) * 1e3:6.3f} ms/inference")
        server += seconds if name != "perf_analyzer" else 0.0
    print(f"  {'all but perf_analyzer':40s} {server / max(n, 1) * 1e3:6.3f} ms/inference")


if __name__ == "__main__":
    main()
