"""Settings of async predictions: ``gateway.async_predict`` (``RTINFER_GATEWAY__ASYNC_PREDICT__*``).

Secrets left unset are generated once into the state dir (``<state_dir>/async-predict/``,
mode 0600) and reused by every gateway and worker that shares the directory: right for the
local stack; in production configure them (every gateway needs the same ``token_secret``,
every worker the same ``callback_secret``).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator

from gateway.secret_files import read_or_create_secret

SECRETS_DIR = "async-predict"


class AsyncPredictSettings(BaseModel):
    """POST /predict/{model}/async: Kafka queue, workers, result store and callbacks."""

    requests_topic: str = Field("inference-requests", description="Topic of accepted jobs.")
    dlq_topic: str = Field(
        "inference-requests-dlq", description="Jobs whose prediction or callback failed for good."
    )
    consumer_group: str = Field("rtinfer-async", description="Kafka consumer group of workers.")
    workers: int = Field(1, ge=0, description="Worker processes `rtinfer stack up` starts.")
    concurrency: int = Field(16, ge=1, description="Jobs one worker process runs at once.")
    enqueue_timeout_s: float = Field(
        5.0, gt=0, description="Wait for Kafka to confirm a job before answering 503."
    )
    default_deadline_ms: int = Field(
        1000, ge=1, le=10_000, description="Prediction deadline of a job without deadline_ms."
    )
    result_ttl_s: int = Field(
        86_400, ge=1, description="How long results stay in Redis (and tokens read pending)."
    )
    redis_url: SecretStr | None = Field(
        None, description="Result store; default: gateway.redis_url, else the stack's Redis."
    )
    predict_attempts: int = Field(
        3, ge=1, description="Tries of a prediction Triton could not serve before it fails."
    )
    callback_attempts: int = Field(
        5, ge=1, description="Tries of a callback POST before the job goes to the DLQ."
    )
    backoff_base_s: float = Field(0.5, gt=0, description="Retry delay ceiling after try 1.")
    backoff_cap_s: float = Field(30.0, gt=0, description="Largest retry delay ceiling.")
    callback_timeout_s: float = Field(10.0, gt=0, description="Timeout of one callback POST.")
    dns_timeout_s: float = Field(2.0, gt=0, description="Timeout of resolving a callback host.")
    allowed_callback_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs callbacks may reach although not public, e.g. 10.20.0.0/16.",
    )
    callback_secret: SecretStr | None = Field(
        None, description="HMAC key of callback signatures; default: generated in the state dir."
    )
    token_secret: SecretStr | None = Field(
        None, description="HMAC key of job tokens; default: generated in the state dir."
    )
    session_timeout_ms: int = Field(
        10_000, ge=1000, description="Kafka consumer session timeout (dead worker detection)."
    )
    lag_refresh_s: float = Field(5.0, gt=0, description="Period of the queue-lag gauges.")
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM, wait this long for running jobs to finish."
    )
    metrics_host: str = Field("127.0.0.1", description="Address of a worker's /metrics.")
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Worker /metrics port; None: off (stack up picks a free one), 0: free.",
    )

    @field_validator("allowed_callback_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"not a CIDR network: {cidr!r} ({exc})") from None
        return value


def secret_bytes(configured: SecretStr | None, state_dir: Path, name: str) -> bytes:
    """``configured``, else ``<state_dir>/async-predict/<name>``, created once if missing."""
    if configured is not None:
        value = configured.get_secret_value()
        if len(value) < 16:
            raise ValueError(f"{name} must be at least 16 characters")
        return value.encode()
    return read_or_create_secret(state_dir / SECRETS_DIR / name).encode()
