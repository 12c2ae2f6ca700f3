"""All configuration of the service and its local stack, from ``RTINFER_*`` environment variables.

Nested sections use ``__``: ``RTINFER_TRITON__HTTP_PORT=9000``, ``RTINFER_REDIS__PORT=6390``.
A port of ``0`` means "pick a free one"; a configured port that is busy is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.config import GatewaySettings
from gateway.lifecycle.config import LifecycleSettings
from gateway.store.config import StoreSettings

REPO_ROOT = Path(__file__).resolve().parents[1]

Target = Literal["cpu", "ngc"]
Service = Literal[
    "redis",
    "postgres",
    "kafka",
    "mlflow",
    "triton",
    "gateway",
    "async-worker",
    "deployer",
    "store",
    "sink",
]


class TritonSettings(BaseModel):
    """How the local tritonserver is launched."""

    host: str = Field("127.0.0.1", description="Address Triton binds and clients dial.")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP/REST port (0 = free port).")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (0 = free port).")
    metrics_port: int = Field(8002, ge=0, le=65535, description="Prometheus port (0 = free).")
    model_repository: Path = Field(
        REPO_ROOT / "model_repository", description="Model repository Triton serves."
    )
    target: Target = Field("cpu", description="cpu: python-backend runners; ngc: FIL/onnxruntime.")
    startup_timeout_s: float = Field(180.0, gt=0, description="Deadline for all models READY.")
    log_verbose: int = Field(0, ge=0, description="tritonserver --log-verbose level.")
    exit_timeout_s: int = Field(10, ge=0, description="Grace period for in-flight requests.")
    latency_summaries: bool = Field(
        False, description="Per-model p50..p99.9 latency summaries on /metrics (costs CPU)."
    )
    malloc: Path | None = Field(
        Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
        description="Allocator preloaded into tritonserver and its stubs (LD_PRELOAD), as "
        "Triton's docs advise: glibc malloc took a fifth of the server's CPU here "
        "(docs/benchmarks.md). Skipped when the file is missing; None: glibc.",
    )


class RedisSettings(BaseModel):
    """The online feature store."""

    host: str = Field("127.0.0.1", description="Redis host.")
    port: int = Field(6380, ge=0, le=65535, description="Redis port (0 = free port).")
    db: int = Field(0, ge=0, description="Redis logical database.")
    timeout_ms: float = Field(10.0, gt=0, description="Socket timeout of feature fetches.")
    key_prefix: str = Field("features", description="Key schema: {prefix}:{entity}:{id}.")

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"


class PostgresSettings(BaseModel):
    """The model catalog database (a private instance in the state dir)."""

    host: str = Field("127.0.0.1", description="Postgres host.")
    port: int = Field(5433, ge=0, le=65535, description="Postgres port (0 = free port).")
    user: str = Field("rtinfer", description="Application role.")
    database: str = Field("rtinfer", description="Database holding the catalog.")


class KafkaSettings(BaseModel):
    """The prediction-log and async-request broker (single KRaft node locally)."""

    host: str = Field("127.0.0.1", description="Broker host.")
    port: int = Field(9093, ge=0, le=65535, description="Client (PLAINTEXT) port (0 = free).")
    controller_port: int = Field(9094, ge=0, le=65535, description="KRaft controller port.")
    libs_dir: Path | None = Field(None, description="Broker jars (default: ~/.cache/rtinfer).")

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"


class MlflowSettings(BaseModel):
    """The model registry: a private ``mlflow server`` (SQLite store, local artifacts)."""

    host: str = Field("127.0.0.1", description="Address the MLflow server binds and clients dial.")
    port: int = Field(5005, ge=0, le=65535, description="HTTP port (0 = free port).")
    startup_timeout_s: float = Field(90.0, gt=0, description="Deadline for /health to answer.")
    workers: int = Field(1, ge=1, description="Server worker processes (uvicorn).")

    @property
    def tracking_uri(self) -> str:
        """The MLflow server's URL, e.g. ``http://127.0.0.1:5005``."""
        return f"http://{self.host}:{self.port}"


class FeatureSettings(BaseModel):
    """Feature assembly inside Triton."""

    cache_max_entities: int = Field(10_000, ge=0, description="Hot-entity LRU size (0 = off).")
    cache_ttl_s: float = Field(5.0, ge=0, description="Hot-entity cache TTL in seconds.")
    breaker_failure_threshold: int = Field(3, ge=1, description="Failures before breaker opens.")
    breaker_reset_timeout_s: float = Field(1.0, gt=0, description="Open time before a trial.")


class BatchingSettings(BaseModel):
    """Dynamic batching of every composing model (bounded queues, no unbounded waits)."""

    max_batch_size: int = Field(64, ge=1, description="Largest batch a model accepts.")
    max_queue_delay_us: int = Field(
        0, ge=0, description="Wait to form a batch; 0 measured best here (docs/benchmarks.md)."
    )
    max_queue_size: int = Field(512, ge=1, description="Queued requests before rejecting.")
    assembler_instances: int = Field(1, ge=1, description="feature_assembler model instances.")
    instances: int = Field(1, ge=1, description="Instances of every other composing model.")
    queue_timeout_us: int = Field(
        1_000_000, ge=1, description="Queued longer than this -> rejected (client may lower it)."
    )
    queue_policy: Literal["all", "entry", "none"] = Field(
        "none",
        description="Models with the bounded queue policy (which also lets a request's timeout "
        "drop it from the queue): all, entry (feature_assembler), none. On Triton 2.51 any "
        "queue policy disables the batcher's prefetch and stalls bursts by 500 ms "
        "(docs/benchmarks.md), so none is the default; the gateway bounds what it sends.",
    )


class PostprocessSettings(BaseModel):
    """Fallback behaviour of the postprocess models."""

    fallback_model: str = Field(
        "fraud_context_lr", description="Context-only model used when features are missing."
    )
    fallback_timeout_ms: int = Field(50, ge=1, description="Deadline of the fallback call.")
    blend_weights: dict[str, float] = Field(
        default_factory=lambda: {"fraud_xgb": 0.6, "fraud_nn": 0.4},
        description="Weights of fraud_blend_pipeline.",
    )
    log_direct: bool = Field(
        True,
        description="Log the predictions of direct Triton clients (HTTP/gRPC, not the gateway) "
        "from the pipelines' postprocess step, to the same Kafka topic with arm 'direct' "
        "(docs/prediction-log.md); needs gateway.prediction_log = kafka.",
    )


class Settings(BaseSettings):
    """Everything rtinfer needs; defaults run a complete local stack."""

    model_config = SettingsConfigDict(
        env_prefix="RTINFER_", env_nested_delimiter="__", extra="ignore"
    )

    state_dir: Path = Field(REPO_ROOT / ".rtinfer", description="Pid files, logs, data.")
    seed: int = Field(7, description="Seed of the synthetic data and demo models.")
    services: list[Service] = Field(
        default_factory=lambda: list(get_args(Service)),
        description="What `stack up` starts (default: all; redis and triton are always started).",
    )
    triton: TritonSettings = Field(default_factory=TritonSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    postprocess: PostprocessSettings = Field(default_factory=PostprocessSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)

    def kafka_bootstrap(self) -> str:
        """The prediction log's brokers: ``gateway.kafka_bootstrap``, else the local stack's."""
        return self.gateway.kafka_bootstrap or self.kafka.bootstrap

    def store_url(self) -> str:
        """The prediction store: ``store.url``, else the local stack's embedded server."""
        if self.store.url is not None:
            return self.store.url.get_secret_value()
        s = self.store
        return f"http://{s.host}:{s.port}/{s.database}"

    def spool_root(self) -> Path:
        """Where prediction-log spools live: ``gateway.spool_dir``, else ``<state_dir>/spool``."""
        return self.gateway.spool_dir or self.state_dir / "spool"
