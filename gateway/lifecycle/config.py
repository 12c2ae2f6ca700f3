"""Lifecycle settings: the ``lifecycle`` section of ``gateway.settings.Settings``.

Read from ``RTINFER_LIFECYCLE__*`` environment variables, e.g. ``RTINFER_LIFECYCLE__DRAIN_S=10``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr


class LifecycleSettings(BaseModel):
    """How new model versions reach traffic: swap procedure, triggers, MLflow webhook."""

    managed_models: tuple[str, ...] = Field(
        ("fraud_xgb", "fraud_nn"),
        description="Catalog models whose versions the lifecycle swaps; each is a scoring "
        "model served by its own pipeline (<model>_pipeline).",
    )
    drain_s: float = Field(
        30.0,
        ge=0,
        description="How long a replaced version keeps serving in-flight requests "
        "after the catalog switch, before it is unloaded.",
    )
    canary_pct: float = Field(
        10.0, gt=0, lt=100, description="Canary share when none is given (alias tag, request)."
    )
    load_timeout_s: float = Field(120.0, gt=0, description="Deadline of one Triton load call.")
    smoke_p50_bound_ms: float = Field(
        50.0, gt=0, description="Median single-row latency a new version must stay under."
    )
    on_register: Literal["promote", "canary", "shadow", "none"] = Field(
        "shadow",
        description="What a new MLflow model version (model_version.created) triggers; aliases "
        "(champion, canary, challenger) act regardless. The default mirrors traffic to it "
        "without serving its answers; promote it with the champion alias.",
    )
    on_drop: Literal["promote", "canary", "shadow"] = Field(
        "promote", description="What a version directory dropped into the repository triggers."
    )
    deployer_host: str = Field("127.0.0.1", description="Address the deployer service binds.")
    deployer_port: int = Field(
        8090, ge=0, le=65535, description="Port of the deployer service (webhook receiver)."
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="Shared secret of the MLflow webhook (HMAC-SHA256). Required: the deployer "
        "refuses to start without one; the local stack generates it into the state dir.",
    )
    webhook_max_skew_s: float = Field(
        300.0, gt=0, description="Webhook deliveries with a timestamp further off are refused."
    )
    reconcile_interval_s: float = Field(
        30.0, gt=0, description="Period of the registry poll that applies missed events."
    )
    watch: bool = Field(True, description="Watch the model repository for dropped versions.")
    watchdog: bool = Field(
        True, description="Probe Triton's models and reload one whose python stub died."
    )
    watchdog_interval_s: float = Field(1.0, gt=0, description="Period of the watchdog's probes.")
    watchdog_probe_timeout_s: float = Field(
        3.0, gt=0, description="A watchdog probe waits this long (a dead stub answers in ~1 s)."
    )
    watch_interval_s: float = Field(1.0, gt=0, description="Repository scan period.")
    watch_settle_s: float = Field(
        3.0,
        ge=0,
        description="A dropped version directory counts as complete once its files (names, "
        "sizes, mtimes) have not changed for this long.",
    )
