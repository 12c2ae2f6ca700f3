"""The local stack: private Redis, PostgreSQL, Kafka, MLflow, Triton, the gateway, the
deployer and workers, run by one supervisord (``rtinfer.supervisor``).

Start order is Redis (+ demo features), PostgreSQL (+ catalog migrations), Kafka (+ topics),
MLflow (the model registry), Triton, then the gateway (which needs the catalog and Triton) and
the async-prediction workers (``gateway.async_predict.workers`` processes); a failure stops
whatever was already started. MLflow takes longest to answer (nothing above needs it), so it
is spawned first and waited for last; then the deployer (catalog, Triton and MLflow) starts
and MLflow's registry webhook is pointed at it. ``down`` stops in reverse order. What runs is
tracked in ``<state>/stack.json``; the supervisor restarts a service that exits unexpectedly.

State that must outlive the processes stays in the state directory: Redis's append-only
file, the Postgres cluster and its password, Kafka's log, MLflow's store with its webhook
encryption key, the webhook secret shared by MLflow and the deployer, the async-prediction
secrets and the prediction-log spool. ``up`` after ``down`` (or after a crash) serves the
same models, API keys and async results.
"""

from __future__ import annotations

import json
import logging
import xmlrpc.client
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
from pydantic import SecretStr

from gateway.catalog.dsn import dsn
from gateway.catalog.migrate import apply_migrations
from gateway.repository.render import render_repository
from gateway.secret_files import read_or_create_secret
from gateway.settings import Settings
from rtinfer.features import load_demo_features
from rtinfer.gateway_server import gateway_url, start_gateway
from rtinfer.kafka_server import DEFAULT_TOPICS, ensure_topics, start_kafka
from rtinfer.mlflow_server import spawn_mlflow, tracking_uri, wait_mlflow
from rtinfer.postgres_server import start_postgres, stop_postgres
from rtinfer.procs import ManagedProcess, Process, pid_alive, resolve_port
from rtinfer.redis_server import start_redis
from rtinfer.store_process import SINK_PREFIX, Pending, sink_name, spawn_sink, spawn_store_server
from rtinfer.supervisor import LIVE_STATES, Supervisor
from rtinfer.triton_server import TritonPorts, reap_orphan_stubs, start_triton
from rtinfer.worker_process import WORKER_PREFIX, start_worker, worker_name

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
#: every service ``up`` can start, in start order
SERVICE_NAMES = ("redis", "postgres", "kafka", "store", "mlflow", "triton", "gateway", "deployer")
#: the MLflow webhook's shared secret, generated once per state directory
WEBHOOK_SECRET_FILE = Path("lifecycle") / "webhook-secret"


@dataclass
class ServiceState:
    pid: int
    port: int
    log: str


@dataclass
class StackState:
    """What ``stack up`` started, so ``down``/``status``/``predict`` can find it.

    ``pid`` fields are the pids at start; the supervisor knows the current ones
    (:func:`service_pid`).
    """

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
    #: ``python -m gateway.asyncpred.worker`` processes; ``port`` is each one's /metrics port
    async_workers: list[ServiceState] = field(default_factory=list)
    #: the embedded prediction store (``python -m gateway.store.server``); None with store.url
    store: ServiceState | None = None
    #: ``python -m gateway.store.sink_service`` processes; ``port`` is each one's /metrics port
    sinks: list[ServiceState] = field(default_factory=list)
    #: supervisord of this stack
    supervisor_pid: int | None = None
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
            "store": self.store,
            "mlflow": self.mlflow,
            "triton": self.triton,
            "gateway": self.gateway,
            "deployer": self.deployer,
        }
        out.update({worker_name(i): svc for i, svc in enumerate(self.async_workers)})
        out.update({sink_name(i): svc for i, svc in enumerate(self.sinks)})
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

    def apply(self, settings: Settings) -> Settings:
        """A copy of ``settings`` pointing at this running stack (its resolved ports)."""
        out = settings.model_copy(deep=True)
        out.redis.port = self.redis.port
        out.triton.http_port, out.triton.grpc_port = self.triton.port, self.triton_grpc_port
        out.triton.metrics_port = self.triton_metrics_port
        out.triton.model_repository = Path(self.model_repository)
        out.triton.target = self.target  # type: ignore[assignment]
        out.gateway.triton_grpc_url = self.triton_ports.grpc_url
        for name in ("postgres", "kafka", "mlflow", "gateway"):
            svc: ServiceState | None = getattr(self, name)
            if svc is not None:
                getattr(out, name).port = svc.port
        if self.deployer is not None:
            out.lifecycle.deployer_port = self.deployer.port
        if self.store is not None:
            out.store.port = self.store.port
        return out

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
        raw["sinks"] = [ServiceState(**w) for w in raw.get("sinks", [])]
        return cls(**raw)


class StackError(RuntimeError):
    """The stack cannot be brought up or is not running."""


def resolve_settings(settings: Settings) -> tuple[Settings, set[str], TritonPorts]:
    """A copy of ``settings`` with free ports filled in, the services to start, Triton's ports."""
    wanted = set(settings.services) | {"redis", "triton"}
    taken: set[int] = set()
    settings = settings.model_copy(deep=True)
    settings.redis.port = resolve_port(settings.redis.port, settings.redis.host, taken)
    if "postgres" in wanted:
        settings.postgres.port = resolve_port(settings.postgres.port, settings.postgres.host, taken)
    if "kafka" in wanted:
        kafka = settings.kafka
        kafka.port = resolve_port(kafka.port, kafka.host, taken)
        kafka.controller_port = resolve_port(kafka.controller_port, kafka.host, taken)
    elif settings.postprocess.log_direct and not settings.gateway.kafka_bootstrap:
        # no broker to log to: Triton's direct clients go unlogged (said once, at start)
        log.warning("kafka is not started: predictions of direct Triton clients are not logged")
        settings.postprocess.log_direct = False
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
        if lc.webhook_secret is None:
            secret = read_or_create_secret(settings.state_dir / WEBHOOK_SECRET_FILE)
            lc.webhook_secret = SecretStr(secret)
    if "async-worker" in wanted and not {"postgres", "kafka"} <= wanted:
        raise StackError("async workers need postgres and kafka in `services`")
    if settings.store.url is not None:
        wanted.discard("store")  # the configured server, not an embedded one
    elif "store" in wanted:
        settings.store.port = resolve_port(settings.store.port, settings.store.host, taken)
    if "sink" in wanted and "kafka" not in wanted and not settings.gateway.kafka_bootstrap:
        log.warning("kafka is not started: no prediction sink runs")
        wanted.discard("sink")
    host = settings.triton.host
    ports = TritonPorts(
        host=host,
        http=resolve_port(settings.triton.http_port, host, taken),
        grpc=resolve_port(settings.triton.grpc_port, host, taken),
        metrics=resolve_port(settings.triton.metrics_port, host, taken),
    )
    return settings, wanted, ports


class _Starter:
    """Starts the services of one ``up`` in order under ``supervisor``; remembers them."""

    def __init__(self, settings: Settings, supervisor: Supervisor, ports: TritonPorts) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.ports = ports
        self.started: dict[str, Process] = {}
        self.worker_ports: list[int] = []
        self.sink_ports: list[int] = []
        #: spawned, not yet answering: waited for by ``settle``
        self.pending: list[Pending] = []

    def add(self, name: str, proc: Process) -> None:
        self.started[name] = proc

    def mlflow(self) -> None:
        m, state_dir = self.settings.mlflow, self.settings.state_dir
        proc = spawn_mlflow(state_dir / "mlflow", m.port, m.host, m.workers, self.supervisor.add)
        self.add("mlflow", proc)

    def redis(self, load_features: bool) -> None:
        r = self.settings.redis
        data = self.settings.state_dir / "redis"
        self.add("redis", start_redis(data, r.port, r.host, self.supervisor.add))
        if load_features:
            client = redis.Redis.from_url(r.url)
            n = load_demo_features(client, seed=self.settings.seed, prefix=r.key_prefix)
            client.close()
            log.info("loaded %d entities into redis", n)

    def postgres(self) -> None:
        pg, data = self.settings.postgres, self.settings.state_dir / "postgres"
        proc = start_postgres(
            data, pg.port, pg.host, pg.user, pg.database, launch=self.supervisor.add
        )
        self.add("postgres", proc)
        applied = apply_migrations(dsn(data, pg.port, pg.host, pg.user, pg.database).conninfo)
        log.info("catalog migrations applied: %s", applied or "none pending")

    def kafka(self) -> None:
        k = self.settings.kafka
        proc = start_kafka(
            self.settings.state_dir / "kafka",
            k.port,
            k.controller_port,
            k.host,
            libs=k.libs_dir,
            launch=self.supervisor.add,
        )
        self.add("kafka", proc)
        created = ensure_topics(k.bootstrap, DEFAULT_TOPICS)
        log.info("kafka topics created: %s", created or "all present")

    def triton(self, repository: Path, models: list[str]) -> None:
        t = self.settings.triton
        proc = start_triton(
            repository,
            self.settings.state_dir,
            self.ports,
            models,
            startup_timeout_s=t.startup_timeout_s,
            log_verbose=t.log_verbose,
            exit_timeout_s=t.exit_timeout_s,
            latency_summaries=t.latency_summaries,
            launch=self.supervisor.add,
            malloc=t.malloc,
        )
        self.add("triton", proc)

    def gateway(self) -> None:
        proc = start_gateway(self.settings, self.ports.grpc_url, launch=self.supervisor.add)
        self.add("gateway", proc)

    def workers(self) -> None:
        for i in range(self.settings.gateway.async_predict.workers):
            proc, port = start_worker(
                self.settings, self.ports.grpc_url, i, launch=self.supervisor.add
            )
            self.add(worker_name(i), proc)
            self.worker_ports.append(port)

    def store(self) -> None:
        pending = spawn_store_server(self.settings, launch=self.supervisor.add)
        self.add("store", pending.proc)
        self.pending.append(pending)

    def sinks(self) -> None:
        self.settle()  # the sinks migrate the store at start: it must answer first
        for i in range(self.settings.store.sinks):
            pending = spawn_sink(self.settings, i, launch=self.supervisor.add)
            self.add(sink_name(i), pending.proc)
            self.sink_ports.append(pending.port)
            self.pending.append(pending)

    def settle(self) -> None:
        """Wait until every spawned service answers."""
        while self.pending:
            self.pending.pop(0).wait()

    def wait_mlflow(self) -> None:
        m = self.settings.mlflow
        wait_mlflow(self.started["mlflow"], m.port, m.host, m.startup_timeout_s)

    def deployer(self, with_mlflow: bool) -> None:
        # here, not at the top: it imports mlflow (2.5 s), which no other CLI command needs
        from rtinfer.deployer_process import register_webhook, start_deployer

        proc = start_deployer(self.settings, self.ports.grpc_url, launch=self.supervisor.add)
        self.add("deployer", proc)
        if with_mlflow:
            m = self.settings.mlflow
            register_webhook(self.settings, tracking_uri(m.host, m.port))

    def state(self, repository: Path, models: list[str]) -> StackState:
        s = self.settings

        def svc(name: str, port: int) -> ServiceState | None:
            proc = self.started.get(name)
            return ServiceState(proc.pid, port, str(proc.log_path)) if proc is not None else None

        return StackState(
            model_repository=str(repository),
            target=s.triton.target,
            models=models,
            redis=svc("redis", s.redis.port),  # type: ignore[arg-type]
            triton=svc("triton", self.ports.http),  # type: ignore[arg-type]
            triton_grpc_port=self.ports.grpc,
            triton_metrics_port=self.ports.metrics,
            host=self.ports.host,
            postgres=svc("postgres", s.postgres.port),
            kafka=svc("kafka", s.kafka.port),
            mlflow=svc("mlflow", s.mlflow.port),
            gateway=svc("gateway", s.gateway.port),
            deployer=svc("deployer", s.lifecycle.deployer_port),
            async_workers=[
                svc(worker_name(i), port)  # type: ignore[misc]
                for i, port in enumerate(self.worker_ports)
            ],
            supervisor_pid=self.supervisor.daemon.pid if self.supervisor.daemon else None,
            store=svc("store", s.store.port),
            sinks=[
                svc(sink_name(i), port)  # type: ignore[misc]
                for i, port in enumerate(self.sink_ports)
            ],
        )


def up(settings: Settings, load_features: bool = True) -> StackState:
    """Start the configured services; Triton once its dependencies answer."""
    if is_running(settings.state_dir):
        raise StackError(
            f"a stack is already running (see {settings.state_dir / STATE_FILE}); "
            "run `rtinfer stack down` first"
        )
    settings, wanted, ports = resolve_settings(settings)
    repository = settings.triton.model_repository.resolve()
    models = render_repository(repository, settings, settings.triton.target)
    supervisor = Supervisor.start(settings.state_dir)
    starter = _Starter(settings, supervisor, ports)
    try:
        _start_all(starter, wanted, repository, models, load_features)
    except BaseException:
        for name in reversed(list(starter.started)):
            supervisor.stop(name)
        supervisor.shutdown()
        raise
    state = starter.state(repository, models)
    state.save(settings.state_dir)
    return state


def _start_all(
    starter: _Starter, wanted: set[str], repository: Path, models: list[str], load_features: bool
) -> None:
    if "mlflow" in wanted:  # slowest to start: spawn now, wait once the rest is up
        starter.mlflow()
    if "store" in wanted:  # spawned now, waited for before the sinks start
        starter.store()
    starter.redis(load_features)
    if "postgres" in wanted:
        starter.postgres()
    if "kafka" in wanted:
        starter.kafka()
    starter.triton(repository, models)
    if "gateway" in wanted:
        starter.gateway()
    if "async-worker" in wanted:
        starter.workers()
    if "sink" in wanted:
        starter.sinks()
    if "mlflow" in wanted:  # nothing above needs it
        starter.wait_mlflow()
    starter.settle()
    if "deployer" in wanted:  # reconciles with MLflow from its start: after MLflow is up
        starter.deployer(with_mlflow="mlflow" in wanted)


def is_running(state_dir: Path) -> bool:
    """A stack of ``state_dir`` runs: its supervisor answers, or a recorded pid is alive."""
    if Supervisor(state_dir).running():
        return True
    state = StackState.load(state_dir)
    return state is not None and any(pid_alive(s.pid) for s in state.services().values())


def down(settings: Settings) -> list[str]:
    """Stop what ``up`` started (Triton first, so in-flight requests finish); return names."""
    state_dir = settings.state_dir
    state = StackState.load(state_dir)
    if state is None:
        return []
    supervisor = Supervisor(state_dir)
    stopped: list[str] = []
    if supervisor.running():
        live = supervisor.all_info()
        for name in reversed(list(state.services())):
            if name in live and live[name]["statename"] in ("STARTING", "RUNNING", "BACKOFF"):
                supervisor.stop(name)
                stopped.append(name)
        supervisor.shutdown()
        reap_orphan_stubs(state_dir / "triton_backends")
    else:  # no supervisor (it crashed): stop what the state file lists
        for name, svc in reversed(state.services().items()):
            proc = ManagedProcess(name=name, pid=svc.pid, log_path=Path(svc.log))
            if proc.alive():
                if name == "postgres":
                    stop_postgres(proc)
                else:
                    proc.stop(timeout_s=settings.triton.exit_timeout_s + 10)
                stopped.append(name)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    for name in SERVICE_NAMES:
        (state_dir / f"{name}.pid").unlink(missing_ok=True)
    for prefix in (WORKER_PREFIX, SINK_PREFIX):
        for pid_file in state_dir.glob(f"{prefix}-*.pid"):
            pid_file.unlink(missing_ok=True)
    return stopped


def restart(settings: Settings, name: str) -> None:
    """Stop service ``name`` cleanly and start it again (same program, same environment)."""
    state = require_running(settings)
    if name not in state.services():
        raise StackError(f"no service {name!r}; the stack runs {', '.join(state.services())}")
    supervisor = Supervisor(settings.state_dir)
    supervisor.stop(name)
    supervisor.start_program(name)


def service_pid(state_dir: Path, name: str) -> int:
    """The current pid of service ``name`` (0 while it is not running)."""
    return int(Supervisor(state_dir).info(name)["pid"])


def service_alive(state_dir: Path, name: str, svc: ServiceState) -> bool:
    """Service ``name`` runs (as its supervisor says; its start pid if none answers)."""
    try:
        return Supervisor(state_dir).info(name)["statename"] in LIVE_STATES
    except (OSError, xmlrpc.client.Error):
        return pid_alive(svc.pid)


def require_running(settings: Settings) -> StackState:
    state = StackState.load(settings.state_dir)
    if state is None or not is_running(settings.state_dir):
        raise StackError("the stack is not running; start it with `rtinfer stack up`")
    return state
