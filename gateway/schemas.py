"""Request and response bodies of the HTTP API (and of the service core behind it)."""

from __future__ import annotations

import math
import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from python_backend.contract import CONTEXT_FEATURES

#: the ensembles' ``context`` input, in tensor order
ContextFeature = Literal[CONTEXT_FEATURES]  # type: ignore[valid-type]

#: which traffic split arm served a prediction
Arm = Literal["prod", "canary"]
#: a deployment's part in serving: a traffic arm, a shadow, or active with 0% traffic
DeploymentRole = Literal["prod", "canary", "shadow", "idle"]

REQUEST_ID_HEADER = "X-Request-ID"
DEGRADED_HEADER = "X-Prediction-Degraded"
MAX_ENTITY_ID_BYTES = 128  # the feature assembler's limit (python_backend/features/assembler.py)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_FLOAT32_MAX = 3.4028234663852886e38


def _float32(value: float) -> float:
    if abs(value) > _FLOAT32_MAX:
        raise ValueError("must be within the float32 range (|x| <= 3.4e38)")
    return value


def _entity_id(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    if size > MAX_ENTITY_ID_BYTES:
        raise ValueError(f"must be at most {MAX_ENTITY_ID_BYTES} bytes in UTF-8")
    return value


FeatureValue = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_float32)]
EntityId = Annotated[
    str, StringConstraints(min_length=1, max_length=128), AfterValidator(_entity_id)
]
RequestId = Annotated[str, StringConstraints(pattern=rf"^{_REQUEST_ID.pattern}$")]


def valid_request_id(value: str | None) -> str | None:
    """``value`` if it is a well-formed request id, else ``None``."""
    return value if value is not None and _REQUEST_ID.fullmatch(value) else None


def new_request_id() -> str:
    return uuid.uuid4().hex


class _Strict(BaseModel):
    # strict: no str -> number or bool -> number coercion; unknown fields are errors
    model_config = ConfigDict(strict=True, extra="forbid")


class EntityIds(_Strict):
    """The entities whose online features the model reads."""

    user_id: EntityId = Field(description="User entity id, e.g. u_000042 (<= 128 bytes).")
    merchant_id: EntityId = Field(description="Merchant entity id, e.g. m_00007 (<= 128 bytes).")


class PredictRequest(_Strict):
    """One prediction: entity ids for the online features plus the request context."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "entity_ids": {"user_id": "u_000042", "merchant_id": "m_00007"},
                    "context": {"amount": 129.99, "hour_of_day": 3, "is_new_device": 1},
                    "deadline_ms": 50,
                }
            ]
        }
    )

    entity_ids: EntityIds
    context: dict[ContextFeature, FeatureValue] = Field(
        default_factory=dict,
        description="Request context features (finite numbers); a missing one is imputed "
        "with the model's registered default.",
    )
    feature_overrides: dict[str, FeatureValue] | None = Field(
        None,
        description="Feature values forced for this request. In this version only the "
        f"context features ({', '.join(CONTEXT_FEATURES)}) can be overridden; an override "
        "replaces the context value. Any other name is rejected with 422.",
    )
    deadline_ms: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Time budget of routing and inference, counted once the request is "
        "authenticated; when it is spent, the deployment's fallback answers (degraded). "
        "Default from the gateway settings (100 ms).",
    )
    request_id: RequestId | None = Field(
        None, description="Caller's id ([A-Za-z0-9._-], <= 64 chars); generated when absent."
    )

    @field_validator("feature_overrides")
    @classmethod
    def _context_features_only(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            other = sorted(set(value) - set(CONTEXT_FEATURES))
            if other:
                raise ValueError(
                    "only context features can be overridden in this version "
                    f"({', '.join(CONTEXT_FEATURES)}); not allowed: {', '.join(other)}"
                )
        return value

    def effective_context(self) -> dict[str, float]:
        """Context with the overrides applied."""
        return {**self.context, **(self.feature_overrides or {})}

    def context_vector(self) -> list[float]:
        """The ensemble's ``context`` row; NaN for a feature not given (imputed in Triton)."""
        ctx = self.effective_context()
        return [ctx.get(name, math.nan) for name in CONTEXT_FEATURES]


class PredictResponse(BaseModel):
    """The served prediction and how it was produced."""

    prediction: float = Field(description="Fraud probability served.")
    label: str = Field(description="fraud when prediction >= the model's threshold, else legit.")
    confidence: float = Field(description="Probability of the returned label.")
    model_name: str = Field(description="Catalog model name, e.g. fraud_xgb.")
    model_version: str = Field(description="Version of the deployment that served.")
    deployment_arm: Arm = Field(description="prod or canary arm of the traffic split.")
    degraded: bool = Field(description="True when features or Triton were unavailable.")
    degraded_reason: str | None = Field(
        None,
        description="Why degraded, e.g. feature_store_unavailable:fraud_context_lr or "
        "triton_unavailable:class_prior; null otherwise.",
    )
    request_id: str = Field(description="Echoed or generated request id.")
    latency_ms: float = Field(description="Time spent in the gateway for this prediction.")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_request.")
    message: str = Field(description="What went wrong; names the offending field(s).")


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx response."""

    error: ErrorDetail


class FallbackInfo(BaseModel):
    type: str
    score: float
    threshold: float


class DeploymentInfo(BaseModel):
    deployment_id: int
    model_version: str
    serving_endpoint: str = Field(description="Triton ensemble serving this deployment.")
    role: DeploymentRole
    traffic_pct: float
    is_shadow: bool
    shadow_sample_pct: float
    feature_groups: list[str]
    fallback: FallbackInfo | None = Field(description="What serves when Triton cannot.")
    deployed_at: datetime


class LifecycleEvent(BaseModel):
    """One row of a model's deployment history."""

    id: int
    deployment_id: int | None
    model_name: str
    action: str = Field(
        description="e.g. deploy_started, promoted, canary, shadow, deploy_failed, retired, "
        "unloaded, rolled_back."
    )
    detail: dict[str, Any] = Field(
        description="What the step recorded: version, trigger, actor; for deploy_failed the "
        "failed step and its error."
    )
    at: datetime


class ModelInfo(BaseModel):
    model_name: str
    deployments: list[DeploymentInfo]
    history: list[LifecycleEvent] | None = Field(
        None,
        description="GET /models/{model_name} only: the model's last 10 lifecycle events, "
        "newest first; null when the model is not managed by the deployer or its history "
        "cannot be read.",
    )


class ModelList(BaseModel):
    models: list[ModelInfo]
    catalog_loaded_at: float | None = Field(description="Unix time of the last catalog load.")


class ProbeHealth(BaseModel):
    """One probe row through the deployment's pipeline (cached for a few seconds)."""

    ok: bool = Field(description="Triton answered (degraded or not).")
    degraded: bool = Field(False, description="The answer was degraded (e.g. no features).")
    degraded_reason: str | None = None
    latency_ms: float | None = None
    error: str | None = Field(None, description="Why Triton did not answer.")
    age_s: float = Field(description="Seconds since the probe ran.")


class TritonModelHealth(BaseModel):
    deployment_id: int
    serving_endpoint: str
    role: DeploymentRole
    ready: bool
    loaded_versions: list[str] = Field(description="Versions of the endpoint READY in Triton.")
    scorer_versions: dict[str, str] = Field(
        default_factory=dict,
        description="Model -> version that answers in the endpoint's pipeline (every step but "
        "feature assembly and postprocessing), resolved from the ensemble config and Triton's "
        "loaded versions.",
    )
    state: str | None = Field(description="Triton's repository-index state, e.g. READY.")
    reason: str | None = None
    probe: ProbeHealth | None = None
    failing_fast: bool = Field(
        False,
        description="The gateway serves this endpoint's fallback without calling Triton "
        "(it answered a non-timeout error; a background probe clears it).",
    )


class FeatureStoreHealth(BaseModel):
    """The online feature store (Redis) as a rate-limited PING sees it, and the share of
    Triton answers degraded with feature_store_unavailable over the last minute."""

    status: Literal["ok", "unavailable"] = Field(description="Result of the last check.")
    error: str | None = None
    latency_ms: float | None = None
    age_s: float = Field(description="Seconds since the check ran.")
    degraded_rate_1m: float | None


class ModelHealth(BaseModel):
    model_name: str
    status: Literal["ok", "degraded", "down"] = Field(
        description="down: Triton unreachable, or no traffic arm READY or answering its probe "
        "(fallbacks serve); degraded: an arm not READY, failing its probe or failing fast, a "
        "degraded probe answer, the feature store unavailable, or most answers of the last "
        "minute degraded; ok otherwise."
    )
    reasons: list[str] = Field(default_factory=list, description="Why the status is not ok.")
    triton_reachable: bool
    triton_error: str | None = None
    deployments: list[TritonModelHealth]
    feature_store: FeatureStoreHealth
    requests_1m: int
    degraded_rate_1m: float | None
    last_inference_latency_ms: float | None = Field(
        description="Latency of the last Triton inference for this model."
    )
    gateway_workers: int = Field(description="Gateway worker processes whose counts are summed.")


class ReadyStatus(BaseModel):
    ready: bool
    catalog: str
    triton: str


#: a catalog model version or Triton model name: letters, digits and ``._-``
CatalogName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,128}$")]


class ClassPriorConfig(_Strict):
    """A deployment's ``fallback_config`` (the only type in this version)."""

    type: Literal["class_prior"]
    score: float = Field(ge=0.0, le=1.0, description="Fraud probability served.")
    threshold: float = Field(ge=0.0, le=1.0, description="Score at and above which: fraud.")


class ShadowRequest(_Strict):
    """A model version to mirror requests to, without answering any."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_version": "2",
                    "serving_endpoint": "fraud_nn_pipeline",
                    "sample_pct": 25,
                }
            ]
        }
    )

    model_version: CatalogName = Field(description="Version registered for the shadow.")
    serving_endpoint: CatalogName = Field(
        description="Triton ensemble serving the shadow; must be READY in Triton."
    )
    sample_pct: float = Field(
        100.0,
        ge=0.01,
        le=100.0,
        description="Share of the model's requests mirrored to the shadow (sticky per request id).",
    )
    feature_groups: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] | None = (
        Field(None, description="Online feature groups read; default: the production arm's.")
    )
    fallback_config: ClassPriorConfig | None = Field(
        None,
        description="Stored with the deployment, for when it is promoted; shadows never serve it.",
    )


class ShadowRemoval(BaseModel):
    model_name: str
    removed: list[DeploymentInfo] = Field(description="The deactivated shadow deployments.")


#: a Triton model version number
ModelVersionNumber = Annotated[int, Field(ge=1, le=2**31 - 1)]


class PromoteRequest(_Strict):
    """Which version becomes the champion; without one, the active canary does."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"version": 2}, {}]})

    version: ModelVersionNumber | None = Field(
        None,
        description="Version in the model repository to serve all traffic; default: the "
        "model's active canary.",
    )


class CanaryRequest(_Strict):
    """A version to serve a share of the model's traffic next to the champion."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"version": 2, "traffic_pct": 10}]})

    version: ModelVersionNumber = Field(description="Version in the model repository.")
    traffic_pct: float = Field(
        gt=0.0, lt=100.0, allow_inf_nan=False, description="Share of traffic the canary gets."
    )


class DeployOutcome(BaseModel):
    """What a lifecycle action changed."""

    model: str
    version: int
    action: str = Field(
        description="promoted, canary, shadow, rolled_back, or unchanged when the version "
        "already served in that role."
    )
    deployment_id: int | None
    previous_version: str | None = Field(description="Version that served before.")
    drain_until: float | None = Field(
        description="Unix time after which the replaced version is unloaded."
    )
    timings_ms: dict[str, float] = Field(
        description="Duration of each step: materialize, load, smoke, catalog."
    )
