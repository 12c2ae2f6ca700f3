"""Async-prediction workers as stack services: ``python -m gateway.worker`` processes.

Each worker gets the stack's resolved settings (see ``rtinfer.gateway_server.settings_env``)
and a ``/metrics`` port of its own; it counts as started once that port answers, which
happens after its serving core is open and its Kafka consumer subscribed.
"""

from __future__ import annotations

import sys
import urllib.request

from rtinfer.gateway_server import settings_env
from rtinfer.procs import ManagedProcess, free_port, spawn, wait_until
from rtinfer.settings import REPO_ROOT, Settings

WORKER_PREFIX = "async-worker"


def worker_name(index: int) -> str:
    return f"{WORKER_PREFIX}-{index}"


def metrics_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2.0) as answer:
        return int(answer.status) == 200


def start_worker(
    settings: Settings,
    triton_grpc_url: str,
    index: int = 0,
    *,
    startup_timeout_s: float = 60.0,
) -> tuple[ManagedProcess, int]:
    """Start worker ``index``; return it and its metrics port once that answers.

    ``settings`` must hold the stack's resolved ports. ``async_predict.metrics_port`` None or
    0 picks a free port (one per worker); a fixed port is used by worker 0 only, the others
    add their index to it.
    """
    cfg = settings.gateway.async_predict
    host = cfg.metrics_host
    port = free_port(host) if not cfg.metrics_port else cfg.metrics_port + index
    gw = settings.gateway.model_copy(
        update={
            "triton_grpc_url": triton_grpc_url,
            "async_predict": cfg.model_copy(update={"metrics_port": port}),
        }
    )
    settings = settings.model_copy(update={"gateway": gw})
    name = worker_name(index)
    proc = spawn(
        name,
        [sys.executable, "-m", "gateway.worker"],
        settings.state_dir / "async-worker" / f"{name}.log",
        env=settings_env(settings),
        cwd=REPO_ROOT,
    )
    url = f"http://{host}:{port}/metrics"
    try:
        wait_until(lambda: metrics_ok(url), startup_timeout_s, proc=proc, what=f"{name} {url}")
    except BaseException:
        proc.stop(timeout_s=10)
        raise
    return proc, port
