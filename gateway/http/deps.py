"""What the app factory takes from outside: the prediction log, the authentication hook and
the model deployer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import Request

if TYPE_CHECKING:
    from gateway.lifecycle.deployer import Deployer


class PredictionLog(Protocol):
    """Where every served prediction is recorded (e.g. Kafka).

    ``log`` is called on the event loop once per prediction, after its response is computed.
    It must return at once (hand the record to a buffer or a thread) and never raise. The
    record holds: request_id, timestamp (unix seconds), model_name, model_version,
    deployment_id, arm, serving_endpoint, entity_ids, context (as sent), feature_overrides,
    features (the served vector; empty when the fallback served), prediction, label,
    confidence, degraded, degraded_reason, latency_ms, stage_latency_ms.

    Requests mirrored to a shadow deployment give a second record with ``arm == "shadow"``
    and the same request_id, plus ``production`` (what production served), ``error`` (the
    shadow's failure or ``None``) and ``sample_pct`` (see docs/prediction-log.md).
    """

    def log(self, record: Mapping[str, Any]) -> None: ...


class DiscardPredictionLog:
    """The default when no prediction log is configured: records are dropped."""

    def log(self, record: Mapping[str, Any]) -> None:
        return None


#: Authenticates (and may rate-limit) a request before any catalog or prediction route runs.
#: Raises ``gateway.errors.Unauthorized`` / ``RateLimited``; returns the principal (e.g. a
#: ``gateway.auth.keys.ApiKey``), which the routes leave on ``request.state.principal``. Catalog
#: writes (shadow registration) need a principal whose ``is_admin`` is true, else 403.
Authenticate = Callable[[Request], Awaitable[object]]


def is_admin(principal: object) -> bool:
    """Whether an authenticated principal may change the catalog."""
    return getattr(principal, "is_admin", False) is True


@dataclass(frozen=True)
class GatewayDeps:
    """Collaborators injected into ``create_app``; ``None`` means the built-in default."""

    prediction_log: PredictionLog | None = None
    #: no authentication when absent
    authenticate: Authenticate | None = None
    #: runs the lifecycle admin routes; built from the settings when absent
    #: (``gateway.serving.core.open_deployer``)
    deployer: Deployer | None = None
