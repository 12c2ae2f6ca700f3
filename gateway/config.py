"""Gateway settings: the ``gateway`` section of ``gateway.settings.Settings``.

Read from ``RTINFER_GATEWAY__*`` environment variables, e.g. ``RTINFER_GATEWAY__PORT=9090``,
``RTINFER_GATEWAY__TRITON_GRPC_URL=triton:8001``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr

from gateway.asyncpred.config import AsyncPredictSettings


class GatewaySettings(BaseModel):
    """The FastAPI gateway: HTTP server, request limits, Triton and catalog connections."""

    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port.")
    workers: int = Field(1, ge=1, description="Worker processes.")
    server: Literal["uvicorn", "granian"] = Field(
        "uvicorn",
        description="HTTP server: uvicorn (httptools) or granian (Rust; `pip install granian`); "
        "docs/benchmarks.md compares them.",
    )
    loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="Event loop of the workers (docs/benchmarks.md compares them).",
    )
    max_body_bytes: int = Field(64 * 1024, ge=1, description="Largest request body (413 above).")
    default_deadline_ms: int = Field(
        100, ge=1, le=10_000, description="Deadline of a prediction without deadline_ms."
    )
    shadow_timeout_ms: int = Field(
        500, ge=1, le=60_000, description="Timeout of one mirrored call to a shadow deployment."
    )
    shadow_max_in_flight: int = Field(
        32, ge=1, description="Shadow calls running at once per worker; beyond: dropped, counted."
    )
    triton_grpc_url: str = Field("127.0.0.1:8001", description="Triton gRPC endpoint host:port.")
    max_in_flight: int = Field(
        200,
        ge=0,
        description="Predictions waiting on Triton per worker beyond which new ones get the "
        "fallback at once (degraded_reason gateway_overloaded:<type>; 503 without a "
        "fallback); 0 = no bound.",
    )
    triton_max_calls: int = Field(
        4,
        ge=1,
        description="Calls in flight per Triton ensemble and worker; predictions arriving "
        "while all are busy are coalesced into the next call (one multi-row request).",
    )
    triton_max_batch_rows: int = Field(
        32, ge=1, le=64, description="Most rows per coalesced call (ensembles take 64)."
    )
    triton_call_grace_ms: float = Field(
        1000.0,
        ge=0,
        le=60_000,
        description="How long a Triton call may outlive the deadlines of its rows (which get "
        "the fallback at their deadline): calls end with Triton's answer instead of a "
        "cancellation (docs/gateway.md).",
    )
    triton_ready_timeout_s: float = Field(
        1.0, gt=0, description="Timeout of Triton readiness and repository-index calls."
    )
    postgres_dsn: SecretStr | None = Field(
        None,
        description="Catalog conninfo or URL; default: the local stack's (settings.postgres).",
    )
    postgres_pool_size: int = Field(4, ge=1, description="Largest Postgres connection pool.")
    postgres_connect_timeout_s: float = Field(3.0, gt=0, description="Postgres connect timeout.")
    catalog_refresh_s: float = Field(
        30.0, gt=0, description="Full catalog reload period (fallback to LISTEN/NOTIFY)."
    )
    catalog_startup_wait_s: float = Field(
        5.0, ge=0, description="Startup wait for the first catalog load (/readyz 503 until)."
    )
    prediction_log: Literal["kafka", "discard"] = Field(
        "kafka", description="kafka: every prediction to Kafka, spooled to disk if it is down."
    )
    prediction_log_linger_ms: float = Field(
        50.0,
        ge=0,
        le=1000,
        description="How long the Kafka producer gathers records into one batch: fewer, larger "
        "requests cost the broker a fraction of the CPU per record (docs/benchmarks.md).",
    )
    kafka_bootstrap: str | None = Field(
        None, description="Prediction-log brokers; default: the local stack's (settings.kafka)."
    )
    spool_dir: Path | None = Field(
        None, description="Prediction-log spool root; default: <state_dir>/spool."
    )
    auth: Literal["api_key", "none"] = Field(
        "api_key",
        description="api_key: every catalog and prediction route needs a key from "
        "`rtinfer apikeys create` (Bearer or X-API-Key) and is rate limited per key in Redis; "
        "none: open (local experiments only).",
    )
    auth_cache_ttl_s: float = Field(
        60.0, gt=0, description="How long a verified key is trusted (revocation delay)."
    )
    redis_url: SecretStr | None = Field(
        None, description="Rate-limit Redis URL; default: the local stack's (settings.redis)."
    )
    feature_store_url: SecretStr | None = Field(
        None,
        description="The online feature store the health endpoint PINGs (Triton's assembler "
        "reads it); default: the local stack's Redis (settings.redis).",
    )
    health_dir: Path | None = Field(
        None,
        description="Where gateway workers share their health counters (one file each); "
        "default: <state_dir>/gateway/health-<port>.",
    )
    health_check_ttl_s: float = Field(
        2.0,
        gt=0,
        description="Probes and the feature-store PING of the health endpoint run "
        "at most this often per endpoint.",
    )
    rate_limit_burst: float = Field(
        2.0, gt=0, description="Bucket size as a multiple of the key's per-second rate."
    )
    rate_limit_lease_s: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Each gateway process takes this many seconds' worth of a key's rate from "
        "Redis at once and serves that key's next requests from it (0: a Redis call per "
        "request).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Level of the gateway's JSON log lines."
    )
    async_predict: AsyncPredictSettings = Field(
        default_factory=AsyncPredictSettings,
        description="POST /predict/{model}/async: Kafka queue, workers, results, callbacks.",
    )
