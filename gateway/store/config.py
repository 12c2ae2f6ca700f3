"""Prediction-store settings: the ``store`` section of ``gateway.settings.Settings``.

Read from ``RTINFER_STORE__*`` environment variables, e.g.
``RTINFER_STORE__URL=https://user:secret@clickhouse:8443/rtinfer``.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, SecretStr


class StoreSettings(BaseModel):
    """Where predictions and labels are stored, and how the sink fills the store."""

    url: SecretStr | None = Field(
        None,
        description="The store: http(s)://[user:password@]host:port/database for a ClickHouse "
        "server (clickhouse-connect), or chdb:///abs/path/database for the embedded engine in "
        "this process. None: the local stack's embedded server (host, port, <state>/clickhouse).",
    )
    host: str = Field("127.0.0.1", description="Address the local embedded server binds.")
    port: int = Field(8124, ge=0, le=65535, description="Its HTTP port (0 = free port).")
    database: str = Field("rtinfer", description="Database of the local embedded server.")
    sinks: int = Field(1, ge=0, description="Sink processes `stack up` starts.")
    group_id: str = Field("rtinfer-prediction-sink", description="The sinks' consumer group.")
    instance_id: str | None = Field(
        None,
        description="This sink's static group membership (group.instance.id): a sink restarted "
        "with the same id takes its partitions back at once, without a rebalance; `stack up` "
        "sets sink-<i>. Unique per live process.",
    )
    session_timeout_ms: int = Field(
        10_000, ge=1000, description="A sink silent this long loses its partitions."
    )
    predictions_topic: str = Field("predictions", description="Prediction records.")
    shadow_topic: str = Field("predictions-shadow", description="Shadow prediction records.")
    labels_topic: str = Field("prediction-labels", description="Ground-truth labels (feedback).")
    dlq_topic: str = Field("predictions-dlq", description="Records the sink cannot store.")
    batch_max_rows: int = Field(5000, ge=1, description="Rows per insert, at most.")
    batch_max_ms: float = Field(
        500.0, gt=0, description="Longest a consumed record waits for its insert."
    )
    insert_retry_max_s: float = Field(
        10.0, gt=0, description="Longest pause between retries of a failed insert."
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the sinks' /metrics.")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Sink 0's /metrics port; sink i adds i. None: free."
    )
    feedback_timeout_s: float = Field(
        5.0, gt=0, description="How long POST /feedback waits for Kafka's acks=all."
    )
    query_timeout_s: float = Field(10.0, gt=0, description="Timeout of one store query.")
