"""The local stack: private Redis, PostgreSQL, Kafka, MLflow, Triton, the gateway, the
deployer and workers.

Start order is Redis (+ demo features), PostgreSQL (+ catalog migrations), Kafka (+ topics),
MLflow (the model registry), Triton, then the gateway (which needs the catalog and Triton) and
the async-prediction workers (``gateway.async_predict.workers`` processes); a failure stops
whatever was already started. MLflow takes longest to answer (nothing above needs it), so it
is spawned first and waited for last; then the deployer (catalog, Triton and MLflow) starts
and MLflow's registry webhook is pointed at it. ``down`` stops in reverse order. What runs is
tracked in ``<state>/stack.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psycopg
import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from rtinfer.deployer_process import register_webhook, start_deployer
from rtinfer.features import load_demo_features
from rtinfer.gateway_server import gateway_url, start_gateway
from rtinfer.kafka_server import DEFAULT_TOPICS, ensure_topics, start_kafka
from rtinfer.migrate import apply_migrations
from rtinfer.mlflow_server import healthy, spawn_mlflow, tracking_uri, wait_mlflow
from rtinfer.postgres_server import dsn, start_postgres, stop_postgres
from rtinfer.procs import ManagedProcess, pid_alive, resolve_port
from rtinfer.redis_server import start_redis
from rtinfer.render import render_repository
from rtinfer.settings import Settings
from rtinfer.triton_server import TritonPorts, http_ok, start_triton
from rtinfer.worker_process import WORKER_PREFIX, start_worker, worker_name

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
#: every service ``up`` can start, in start order
SERVICE_NAMES = ("redis", "postgres", "kafka", "mlflow", "triton", "gateway", "deployer")


@dataclass
class ServiceState:
    pid: int
    port: int
    log: str


@dataclass
class StackState:
    """What ``stack up`` started, so ``down``/``status``/``predict`` can find it."""

    model_repository: str
    target: str
    models: list[str]
    redis: ServiceState
    triton: ServiceState
    triton_grpc_port: int
    triton_metrics_port: int
    host: str = "127.0.0.1"
    postgres: ServiceState | None = None
    kafka: ServiceState | None = None
    mlflow: ServiceState | None = None
    gateway: ServiceState | None = None
    #: ``python -m gateway.lifecycle``: MLflow webhook receiver, reconcile loop, watcher
    deployer: ServiceState | None = None
    #: ``python -m gateway.worker`` processes; ``port`` is each one's /metrics port
    async_workers: list[ServiceState] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def triton_ports(self) -> TritonPorts:
        return TritonPorts(
            self.host, self.triton.port, self.triton_grpc_port, self.triton_metrics_port
        )

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis.port}/0"

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")
        for name, svc in self.services().items():
            (state_dir / f"{name}.pid").write_text(f"{svc.pid}\n")

    def services(self) -> dict[str, ServiceState]:
        """Started services in start order."""
        out = {
            "redis": self.redis,
            "postgres": self.postgres,
            "kafka": self.kafka,
            "mlflow": self.mlflow,
            "triton": self.triton,
            "gateway": self.gateway,
            "deployer": self.deployer,
        }
        out.update({worker_name(i): svc for i, svc in enumerate(self.async_workers)})
        return {name: svc for name, svc in out.items() if svc is not None}

    @property
    def gateway_url(self) -> str | None:
        return gateway_url(self.host, self.gateway.port) if self.gateway is not None else None

    @property
    def kafka_bootstrap(self) -> str | None:
        return f"{self.host}:{self.kafka.port}" if self.kafka is not None else None

    @property
    def mlflow_uri(self) -> str | None:
        """Tracking (and registry) URI of the stack's MLflow server."""
        return tracking_uri(self.host, self.mlflow.port) if self.mlflow is not None else None

    @classmethod
    def load(cls, state_dir: Path) -> StackState | None:
        path = state_dir / STATE_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        for name in SERVICE_NAMES:
            if raw.get(name) is not None:
                raw[name] = ServiceState(**raw[name])
        raw["async_workers"] = [ServiceState(**w) for w in raw.get("async_workers", [])]
        return cls(**raw)


class StackError(RuntimeError):
    """The stack cannot be brought up or is not running."""


def up(settings: Settings, load_features: bool = True) -> StackState:
    """Start the configured services; Triton last, once its dependencies answer."""
    state_dir = settings.state_dir
    existing = StackState.load(state_dir)
    if existing is not None and any(pid_alive(s.pid) for s in existing.services().values()):
        raise StackError(
            f"a stack is already running (see {state_dir / STATE_FILE}); "
            "run `rtinfer stack down` first"
        )
    host = settings.triton.host
    wanted = set(settings.services) | {"redis", "triton"}
    taken: set[int] = set()
    settings = settings.model_copy(deep=True)
    settings.redis.port = resolve_port(settings.redis.port, settings.redis.host, taken)
    if "postgres" in wanted:
        settings.postgres.port = resolve_port(settings.postgres.port, settings.postgres.host, taken)
    if "kafka" in wanted:
        settings.kafka.port = resolve_port(settings.kafka.port, settings.kafka.host, taken)
        settings.kafka.controller_port = resolve_port(
            settings.kafka.controller_port, settings.kafka.host, taken
        )
    if "mlflow" in wanted:
        settings.mlflow.port = resolve_port(settings.mlflow.port, settings.mlflow.host, taken)
    if "gateway" in wanted:
        if "postgres" not in wanted:
            raise StackError("the gateway needs postgres (its model catalog) in `services`")
        if "kafka" not in wanted and settings.gateway.prediction_log == "kafka":
            log.warning("kafka is not started: the gateway's prediction log discards records")
            settings.gateway.prediction_log = "discard"
        settings.gateway.port = resolve_port(settings.gateway.port, settings.gateway.host, taken)
    if "deployer" in wanted:
        if "postgres" not in wanted:
            raise StackError("the deployer needs postgres (its model catalog) in `services`")
        if "mlflow" not in wanted:
            log.warning("mlflow is not started: the deployer's registry reconcile will fail")
        lc = settings.lifecycle
        lc.deployer_port = resolve_port(lc.deployer_port, lc.deployer_host, taken)
    if "async-worker" in wanted and not {"postgres", "kafka"} <= wanted:
        raise StackError("async workers need postgres and kafka in `services`")
    ports = TritonPorts(
        host=host,
        http=resolve_port(settings.triton.http_port, host, taken),
        grpc=resolve_port(settings.triton.grpc_port, host, taken),
        metrics=resolve_port(settings.triton.metrics_port, host, taken),
    )
    repo = settings.triton.model_repository.resolve()
    models = render_repository(repo, settings, settings.triton.target)

    started: list[tuple[str, ManagedProcess]] = []
    worker_ports: list[int] = []  # /metrics of each async worker
    try:
        if "mlflow" in wanted:  # slowest to start: spawn now, wait once the rest is up
            mlflow = settings.mlflow
            started.append(
                (
                    "mlflow",
                    spawn_mlflow(state_dir / "mlflow", mlflow.port, mlflow.host, mlflow.workers),
                )
            )
        started.append(
            ("redis", start_redis(state_dir / "redis", settings.redis.port, settings.redis.host))
        )
        if load_features:
            client = redis.Redis.from_url(settings.redis.url)
            n = load_demo_features(client, seed=settings.seed, prefix=settings.redis.key_prefix)
            client.close()
            log.info("loaded %d entities into redis", n)
        if "postgres" in wanted:
            pg = settings.postgres
            started.append(
                (
                    "postgres",
                    start_postgres(state_dir / "postgres", pg.port, pg.host, pg.user, pg.database),
                )
            )
            applied = apply_migrations(
                dsn(state_dir / "postgres", pg.port, pg.host, pg.user, pg.database).conninfo
            )
            log.info("catalog migrations applied: %s", applied or "none pending")
        if "kafka" in wanted:
            kafka = settings.kafka
            started.append(
                (
                    "kafka",
                    start_kafka(
                        state_dir / "kafka",
                        kafka.port,
                        kafka.controller_port,
                        kafka.host,
                        libs=kafka.libs_dir,
                    ),
                )
            )
            created = ensure_topics(kafka.bootstrap, DEFAULT_TOPICS)
            log.info("kafka topics created: %s", created or "all present")
        started.append(
            (
                "triton",
                start_triton(
                    repo,
                    state_dir,
                    ports,
                    models,
                    startup_timeout_s=settings.triton.startup_timeout_s,
                    log_verbose=settings.triton.log_verbose,
                    exit_timeout_s=settings.triton.exit_timeout_s,
                    latency_summaries=settings.triton.latency_summaries,
                ),
            )
        )
        if "gateway" in wanted:
            started.append(("gateway", start_gateway(settings, f"{host}:{ports.grpc}")))
        if "async-worker" in wanted:
            for i in range(settings.gateway.async_predict.workers):
                worker, metrics_port = start_worker(settings, f"{host}:{ports.grpc}", i)
                started.append((worker_name(i), worker))
                worker_ports.append(metrics_port)
        if "mlflow" in wanted:  # nothing above needs it
            wait_mlflow(
                dict(started)["mlflow"],
                settings.mlflow.port,
                settings.mlflow.host,
                settings.mlflow.startup_timeout_s,
            )
        if "deployer" in wanted:  # reconciles with MLflow from its start: after MLflow is up
            started.append(("deployer", start_deployer(settings, f"{host}:{ports.grpc}")))
            if "mlflow" in wanted:
                register_webhook(settings, tracking_uri(settings.mlflow.host, settings.mlflow.port))
    except BaseException:
        for name, proc in reversed(started):
            _stop(name, proc, settings)
        raise
    procs = dict(started)

    def svc(name: str, port: int) -> ServiceState | None:
        proc = procs.get(name)
        return ServiceState(proc.pid, port, str(proc.log_path)) if proc is not None else None

    state = StackState(
        model_repository=str(repo),
        target=settings.triton.target,
        models=models,
        redis=svc("redis", settings.redis.port),  # type: ignore[arg-type]
        triton=svc("triton", ports.http),  # type: ignore[arg-type]
        triton_grpc_port=ports.grpc,
        triton_metrics_port=ports.metrics,
        host=host,
        postgres=svc("postgres", settings.postgres.port),
        kafka=svc("kafka", settings.kafka.port),
        mlflow=svc("mlflow", settings.mlflow.port),
        gateway=svc("gateway", settings.gateway.port),
        deployer=svc("deployer", settings.lifecycle.deployer_port),
        async_workers=[
            ServiceState(procs[worker_name(i)].pid, port, str(procs[worker_name(i)].log_path))
            for i, port in enumerate(worker_ports)
        ],
    )
    state.save(state_dir)
    return state


def _stop(name: str, proc: ManagedProcess, settings: Settings) -> None:
    if name == "postgres":
        stop_postgres(proc)  # fast shutdown: SIGTERM would wait for every client to leave
    else:
        proc.stop(timeout_s=settings.triton.exit_timeout_s + 10)


def down(settings: Settings) -> list[str]:
    """Stop what ``up`` started (Triton first, so in-flight requests finish); return names."""
    state = StackState.load(settings.state_dir)
    if state is None:
        return []
    stopped = []
    for name, svc in reversed(state.services().items()):
        proc = ManagedProcess(name=name, pid=svc.pid, log_path=Path(svc.log))
        if proc.alive():
            _stop(name, proc, settings)
            stopped.append(name)
    (settings.state_dir / STATE_FILE).unlink(missing_ok=True)
    for name in SERVICE_NAMES:
        (settings.state_dir / f"{name}.pid").unlink(missing_ok=True)
    for pid_file in settings.state_dir.glob(f"{WORKER_PREFIX}-*.pid"):
        pid_file.unlink(missing_ok=True)
    return stopped


def status(settings: Settings) -> dict[str, object]:
    """Liveness and readiness of each service of the running stack."""
    state = StackState.load(settings.state_dir)
    if state is None:
        return {"running": False}
    base = f"http://{state.host}:{state.triton.port}"
    triton_ready = http_ok(f"{base}/v2/health/ready")
    try:
        redis_ok = bool(redis.Redis.from_url(state.redis_url, socket_timeout=0.5).ping())
    except redis.RedisError:
        redis_ok = False
    models = (
        {m: http_ok(f"{base}/v2/models/{m}/ready") for m in state.models} if triton_ready else {}
    )
    out: dict[str, object] = {
        "running": True,
        "redis": {
            "pid": state.redis.pid,
            "alive": pid_alive(state.redis.pid),
            "ping": redis_ok,
            "url": state.redis_url,
        },
        "triton": {
            "pid": state.triton.pid,
            "alive": pid_alive(state.triton.pid),
            "ready": triton_ready,
            "http": f"{state.host}:{state.triton.port}",
            "grpc": f"{state.host}:{state.triton_grpc_port}",
            "metrics": f"http://{state.host}:{state.triton_metrics_port}/metrics",
            "models": models,
        },
        "model_repository": state.model_repository,
        "target": state.target,
    }
    if state.postgres is not None:
        out["postgres"] = _postgres_status(settings, state.host, state.postgres)
    if state.kafka is not None:
        out["kafka"] = _kafka_status(state.host, state.kafka)
    if state.mlflow is not None:
        out["mlflow"] = {
            "pid": state.mlflow.pid,
            "alive": pid_alive(state.mlflow.pid),
            "healthy": healthy(state.mlflow_uri),  # type: ignore[arg-type]
            "tracking_uri": state.mlflow_uri,
        }
    if state.gateway is not None:
        out["gateway"] = _gateway_status(state.host, state.gateway)
    if state.deployer is not None:
        out["deployer"] = _gateway_status(settings.lifecycle.deployer_host, state.deployer)
    if state.async_workers:
        out["async_workers"] = [
            {
                "pid": w.pid,
                "alive": pid_alive(w.pid),
                "metrics": f"http://{settings.gateway.async_predict.metrics_host}:{w.port}/metrics",
            }
            for w in state.async_workers
        ]
    return out


def _gateway_status(host: str, svc: ServiceState) -> dict[str, object]:
    url = gateway_url(host, svc.port)
    info: dict[str, object] = {"pid": svc.pid, "alive": pid_alive(svc.pid), "url": url}
    try:
        info["readyz"] = httpx.get(f"{url}/readyz", timeout=2.0).json()
    except (httpx.HTTPError, ValueError) as exc:
        info["error"] = str(exc) or type(exc).__name__
    return info


def _postgres_status(settings: Settings, host: str, svc: ServiceState) -> dict[str, object]:
    pg = settings.postgres
    info: dict[str, object] = {
        "pid": svc.pid,
        "alive": pid_alive(svc.pid),
        "url": f"postgresql://{pg.user}@{host}:{svc.port}/{pg.database}",
    }
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


def _kafka_status(host: str, svc: ServiceState) -> dict[str, object]:
    bootstrap = f"{host}:{svc.port}"
    info: dict[str, object] = {"pid": svc.pid, "alive": pid_alive(svc.pid), "bootstrap": bootstrap}
    try:
        meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=3)
        info["topics"] = {
            t: len(m.partitions) for t, m in sorted(meta.topics.items()) if not t.startswith("__")
        }
    except KafkaException as exc:
        info["error"] = str(exc)
    return info


def require_running(settings: Settings) -> StackState:
    state = StackState.load(settings.state_dir)
    if state is None or not pid_alive(state.triton.pid):
        raise StackError("the stack is not running; start it with `rtinfer stack up`")
    return state
