"""``rtinfer stack status``: each service of the running stack as its supervisor and its own
health checks see it (current pid, supervisor state, uptime, readiness)."""

from __future__ import annotations

import contextlib
import xmlrpc.client
from typing import Any

import httpx
import psycopg
import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from gateway.catalog.dsn import dsn
from gateway.settings import Settings
from rtinfer.gateway_server import gateway_url
from rtinfer.mlflow_server import healthy
from rtinfer.procs import pid_alive
from rtinfer.stack import ServiceState, StackState
from rtinfer.supervisor import LIVE_STATES, Supervisor
from rtinfer.triton_server import http_ok


def status(settings: Settings) -> dict[str, object]:
    """Liveness and readiness of each service of the running stack."""
    state = StackState.load(settings.state_dir)
    if state is None:
        return {"running": False}
    supervised = _supervised(Supervisor(settings.state_dir))
    out: dict[str, object] = {
        "running": True,
        "supervisor": {"pid": state.supervisor_pid, "answers": supervised is not None},
        "redis": {**_process(state.redis, "redis", supervised), **_redis(state)},
        "triton": {**_process(state.triton, "triton", supervised), **_triton(state)},
        "model_repository": state.model_repository,
        "target": state.target,
    }
    if state.postgres is not None:
        out["postgres"] = {
            **_process(state.postgres, "postgres", supervised),
            **_postgres(settings, state.host, state.postgres),
        }
    if state.kafka is not None:
        out["kafka"] = {**_process(state.kafka, "kafka", supervised), **_kafka(state)}
    if state.mlflow is not None:
        out["mlflow"] = {
            **_process(state.mlflow, "mlflow", supervised),
            "healthy": healthy(state.mlflow_uri),  # type: ignore[arg-type]
            "tracking_uri": state.mlflow_uri,
        }
    if state.gateway is not None:
        out["gateway"] = {
            **_process(state.gateway, "gateway", supervised),
            **_http_service(state.host, state.gateway),
        }
    if state.deployer is not None:
        out["deployer"] = {
            **_process(state.deployer, "deployer", supervised),
            **_http_service(settings.lifecycle.deployer_host, state.deployer),
        }
    if state.async_workers:
        host = settings.gateway.async_predict.metrics_host
        out["async_workers"] = [
            {
                **_process(w, f"async-worker-{i}", supervised),
                "metrics": f"http://{host}:{w.port}/metrics",
            }
            for i, w in enumerate(state.async_workers)
        ]
    if state.store is not None:
        url = f"http://{state.host}:{state.store.port}"
        out["store"] = {
            **_process(state.store, "store", supervised),
            "url": f"{url}/{settings.store.database}",
            "ping": http_ok(f"{url}/ping"),
        }
    if state.sinks:
        host = settings.store.metrics_host
        out["sinks"] = [
            {**_process(w, f"sink-{i}", supervised), "metrics": f"http://{host}:{w.port}/metrics"}
            for i, w in enumerate(state.sinks)
        ]
    return out


def _supervised(supervisor: Supervisor) -> dict[str, dict[str, Any]] | None:
    with contextlib.suppress(OSError, xmlrpc.client.Error):
        return supervisor.all_info()
    return None


def _process(
    svc: ServiceState, name: str, supervised: dict[str, dict[str, Any]] | None
) -> dict[str, object]:
    """pid, liveness and the supervisor's view (state, uptime) of one service."""
    info = (supervised or {}).get(name)
    if info is None:
        return {"pid": svc.pid, "alive": pid_alive(svc.pid)}
    running = info["statename"] in LIVE_STATES
    return {
        "pid": info["pid"] if running else None,
        "alive": running,
        "state": info["statename"],
        "uptime_s": max(0, int(info["now"]) - int(info["start"])) if running else 0,
        "started_pid": svc.pid,
    }


def _redis(state: StackState) -> dict[str, object]:
    try:
        ok = bool(redis.Redis.from_url(state.redis_url, socket_timeout=0.5).ping())
    except redis.RedisError:
        ok = False
    return {"ping": ok, "url": state.redis_url}


def _triton(state: StackState) -> dict[str, object]:
    base = f"http://{state.host}:{state.triton.port}"
    ready = http_ok(f"{base}/v2/health/ready")
    models = {m: http_ok(f"{base}/v2/models/{m}/ready") for m in state.models} if ready else {}
    return {
        "ready": ready,
        "http": f"{state.host}:{state.triton.port}",
        "grpc": f"{state.host}:{state.triton_grpc_port}",
        "metrics": f"http://{state.host}:{state.triton_metrics_port}/metrics",
        "models": models,
    }


def _http_service(host: str, svc: ServiceState) -> dict[str, object]:
    url = gateway_url(host, svc.port)
    info: dict[str, object] = {"url": url}
    try:
        info["readyz"] = httpx.get(f"{url}/readyz", timeout=2.0).json()
    except (httpx.HTTPError, ValueError) as exc:
        info["error"] = str(exc) or type(exc).__name__
    return info


def _postgres(settings: Settings, host: str, svc: ServiceState) -> dict[str, object]:
    pg = settings.postgres
    info: dict[str, object] = {"url": f"postgresql://{pg.user}@{host}:{svc.port}/{pg.database}"}
    try:
        conninfo = dsn(
            settings.state_dir / "postgres", svc.port, host, pg.user, pg.database
        ).conninfo
        with psycopg.connect(conninfo, connect_timeout=2) as conn:
            row = conn.execute("SELECT count(*) FROM model_deployments WHERE is_active").fetchone()
        info["active_deployments"] = row[0] if row else 0
    except (psycopg.Error, OSError) as exc:
        info["error"] = str(exc).strip()
    return info


def _kafka(state: StackState) -> dict[str, object]:
    bootstrap = state.kafka_bootstrap
    info: dict[str, object] = {"bootstrap": bootstrap}
    try:
        meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=3)
        info["topics"] = {
            t: len(m.partitions) for t, m in sorted(meta.topics.items()) if not t.startswith("__")
        }
    except KafkaException as exc:
        info["error"] = str(exc)
    return info
