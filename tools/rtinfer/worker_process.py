"""Async-prediction workers as stack services: ``python -m gateway.asyncpred.worker`` processes.

Each worker gets the stack's resolved settings (see ``rtinfer.gateway_server.settings_env``)
and a ``/metrics`` port of its own; it counts as started once that port answers, which
happens after its serving core is open and its Kafka consumer subscribed.
"""

from __future__ import annotations

from gateway.settings import Settings
from rtinfer.gateway_server import spawn_settled
from rtinfer.procs import Launch, Process, free_port, spawn_program

WORKER_PREFIX = "async-worker"


def worker_name(index: int) -> str:
    return f"{WORKER_PREFIX}-{index}"


def start_worker(
    settings: Settings,
    triton_grpc_url: str,
    index: int = 0,
    *,
    startup_timeout_s: float = 60.0,
    launch: Launch = spawn_program,
) -> tuple[Process, int]:
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
    proc = spawn_settled(
        name,
        "gateway.asyncpred.worker",
        settings,
        settings.state_dir / "async-worker" / f"{name}.log",
        f"http://{host}:{port}/metrics",
        startup_timeout_s=startup_timeout_s,
        launch=launch,
    )
    return proc, port
