"""The local stack: a private redis-server and tritonserver, tracked in ``<state>/stack.json``."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis

from rtinfer.features import load_demo_features
from rtinfer.procs import ManagedProcess, pid_alive, resolve_port
from rtinfer.redis_server import start_redis
from rtinfer.render import render_repository
from rtinfer.settings import Settings
from rtinfer.triton_server import TritonPorts, http_ok, start_triton

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"


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
        for name, svc in (("redis", self.redis), ("triton", self.triton)):
            (state_dir / f"{name}.pid").write_text(f"{svc.pid}\n")

    @classmethod
    def load(cls, state_dir: Path) -> StackState | None:
        path = state_dir / STATE_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        raw["redis"] = ServiceState(**raw["redis"])
        raw["triton"] = ServiceState(**raw["triton"])
        return cls(**raw)


class StackError(RuntimeError):
    """The stack cannot be brought up or is not running."""


def up(settings: Settings, load_features: bool = True) -> StackState:
    """Start Redis (+ demo features) and Triton serving the rendered repository."""
    state_dir = settings.state_dir
    existing = StackState.load(state_dir)
    if existing is not None and (pid_alive(existing.redis.pid) or pid_alive(existing.triton.pid)):
        raise StackError(
            f"a stack is already running (see {state_dir / STATE_FILE}); "
            "run `rtinfer stack down` first"
        )
    host = settings.triton.host
    taken: set[int] = set()
    redis_port = resolve_port(settings.redis.port, settings.redis.host, taken)
    ports = TritonPorts(
        host=host,
        http=resolve_port(settings.triton.http_port, host, taken),
        grpc=resolve_port(settings.triton.grpc_port, host, taken),
        metrics=resolve_port(settings.triton.metrics_port, host, taken),
    )
    settings = settings.model_copy(deep=True)
    settings.redis.port = redis_port
    repo = settings.triton.model_repository.resolve()
    models = render_repository(repo, settings, settings.triton.target)

    redis_proc = start_redis(state_dir / "redis", redis_port, settings.redis.host)
    triton_proc: ManagedProcess | None = None
    try:
        if load_features:
            client = redis.Redis.from_url(settings.redis.url)
            n = load_demo_features(client, seed=settings.seed, prefix=settings.redis.key_prefix)
            client.close()
            log.info("loaded %d entities into redis", n)
        triton_proc = start_triton(
            repo,
            state_dir,
            ports,
            models,
            startup_timeout_s=settings.triton.startup_timeout_s,
            log_verbose=settings.triton.log_verbose,
            exit_timeout_s=settings.triton.exit_timeout_s,
            latency_summaries=settings.triton.latency_summaries,
        )
    except Exception:
        if triton_proc is not None:
            triton_proc.stop()
        redis_proc.stop()
        raise
    state = StackState(
        model_repository=str(repo),
        target=settings.triton.target,
        models=models,
        redis=ServiceState(redis_proc.pid, redis_port, str(redis_proc.log_path)),
        triton=ServiceState(triton_proc.pid, ports.http, str(triton_proc.log_path)),
        triton_grpc_port=ports.grpc,
        triton_metrics_port=ports.metrics,
        host=host,
    )
    state.save(state_dir)
    return state


def down(settings: Settings) -> list[str]:
    """Stop what ``up`` started (Triton first, so in-flight requests finish); return names."""
    state = StackState.load(settings.state_dir)
    if state is None:
        return []
    stopped = []
    for name, svc in (("triton", state.triton), ("redis", state.redis)):
        proc = ManagedProcess(name=name, pid=svc.pid, log_path=Path(svc.log))
        if proc.alive():
            proc.stop(timeout_s=settings.triton.exit_timeout_s + 10)
            stopped.append(name)
    (settings.state_dir / STATE_FILE).unlink(missing_ok=True)
    for name in ("redis", "triton"):
        (settings.state_dir / f"{name}.pid").unlink(missing_ok=True)
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
    return {
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


def require_running(settings: Settings) -> StackState:
    state = StackState.load(settings.state_dir)
    if state is None or not pid_alive(state.triton.pid):
        raise StackError("the stack is not running; start it with `rtinfer stack up`")
    return state
