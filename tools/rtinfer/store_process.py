"""The prediction store's stack services: the embedded ClickHouse server and the sinks.

``store``: ``python -m gateway.store.server`` (chdb over ``<state>/clickhouse`` behind
ClickHouse's HTTP interface), started when ``store.url`` is unset; ready once ``/ping``
answers. ``sink-<i>``: ``python -m gateway.store.sink_service`` processes, each with a
``/metrics`` port of its own, ready once it answers (after the store's migrations ran and
its consumer subscribed).
"""

from __future__ import annotations

from gateway.settings import Settings
from rtinfer.gateway_server import spawn_settled
from rtinfer.procs import Launch, Process, free_port, spawn_program

SINK_PREFIX = "sink"


def sink_name(index: int) -> str:
    return f"{SINK_PREFIX}-{index}"


def start_store_server(
    settings: Settings, *, startup_timeout_s: float = 60.0, launch: Launch = spawn_program
) -> Process:
    """The embedded server on ``store.host:store.port`` (resolved by the caller)."""
    s = settings.store
    return spawn_settled(
        "store",
        "gateway.store.server",
        settings,
        settings.state_dir / "store" / "store.log",
        f"http://{s.host}:{s.port}/ping",
        startup_timeout_s=startup_timeout_s,
        launch=launch,
    )


def start_sink(
    settings: Settings,
    index: int = 0,
    *,
    startup_timeout_s: float = 60.0,
    launch: Launch = spawn_program,
) -> tuple[Process, int]:
    """Sink ``index``; return it and its metrics port once that answers."""
    cfg = settings.store
    port = free_port(cfg.metrics_host) if not cfg.metrics_port else cfg.metrics_port + index
    settings = settings.model_copy(update={"store": cfg.model_copy(update={"metrics_port": port})})
    name = sink_name(index)
    proc = spawn_settled(
        name,
        "gateway.store.sink_service",
        settings,
        settings.state_dir / "store" / f"{name}.log",
        f"http://{cfg.metrics_host}:{port}/metrics",
        startup_timeout_s=startup_timeout_s,
        launch=launch,
    )
    return proc, port
