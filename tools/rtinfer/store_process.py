"""The prediction store's stack services: the embedded ClickHouse server and the sinks.

``store``: ``python -m gateway.store.server`` (chdb over ``<state>/clickhouse`` behind
ClickHouse's HTTP interface), started when ``store.url`` is unset; ready once ``/ping``
answers. ``sink-<i>``: ``python -m gateway.store.sink_service`` processes, each with a
``/metrics`` port of its own, ready once it answers (after the store's migrations ran and
its consumer subscribed). Both are spawned first and waited for later (:class:`Pending`), so
their start-up overlaps the other services'.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.settings import Settings
from rtinfer.gateway_server import spawn_module, wait_answering
from rtinfer.procs import Launch, Process, free_port, spawn_program

SINK_PREFIX = "sink"
STARTUP_TIMEOUT_S = 60.0


def sink_name(index: int) -> str:
    return f"{SINK_PREFIX}-{index}"


@dataclass(frozen=True)
class Pending:
    """A spawned service and the URL that answers once it is ready."""

    name: str
    proc: Process
    ready_url: str
    port: int

    def wait(self, timeout_s: float = STARTUP_TIMEOUT_S) -> Process:
        wait_answering(self.proc, self.name, self.ready_url, timeout_s)
        return self.proc


def spawn_store_server(settings: Settings, *, launch: Launch = spawn_program) -> Pending:
    """The embedded server on ``store.host:store.port`` (resolved by the caller)."""
    s = settings.store
    proc = spawn_module(
        "store",
        "gateway.store.server",
        settings,
        settings.state_dir / "store" / "store.log",
        launch=launch,
    )
    return Pending("store", proc, f"http://{s.host}:{s.port}/ping", s.port)


def spawn_sink(settings: Settings, index: int = 0, *, launch: Launch = spawn_program) -> Pending:
    """Sink ``index`` with a metrics port of its own (``store.metrics_port`` + index, or free)."""
    cfg = settings.store
    port = free_port(cfg.metrics_host) if not cfg.metrics_port else cfg.metrics_port + index
    name = sink_name(index)
    store = cfg.model_copy(update={"metrics_port": port, "instance_id": name})
    settings = settings.model_copy(update={"store": store})
    proc = spawn_module(
        name,
        "gateway.store.sink_service",
        settings,
        settings.state_dir / "store" / f"{name}.log",
        launch=launch,
    )
    return Pending(name, proc, f"http://{cfg.metrics_host}:{port}/metrics", port)
