"""What the routes of one app serve with, and how a route reaches it from its request."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from psycopg_pool import AsyncConnectionPool

from gateway.catalog.snapshot import Catalog, ModelEntry
from gateway.config import GatewaySettings
from gateway.errors import ModelNotFound, UpstreamUnavailable
from gateway.metrics import GatewayMetrics
from gateway.schemas import ErrorResponse
from gateway.serving.health import HealthTracker
from gateway.serving.model_health import HealthChecks
from gateway.serving.service import PredictionService
from gateway.serving.triton_client import TritonClient

if TYPE_CHECKING:
    from gateway.lifecycle.deployer import Deployer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """What one app instance serves with; built in the app's lifespan."""

    settings: GatewaySettings
    triton: TritonClient
    pool: AsyncConnectionPool
    catalog: Catalog
    service: PredictionService
    health: HealthTracker
    metrics: GatewayMetrics
    #: runs the lifecycle admin routes
    deployer: Deployer
    #: probes and feature-store checks of the per-model health
    checks: HealthChecks


def install_metrics(app: Any, metrics: GatewayMetrics) -> None:
    """The app's metrics, readable before its lifespan started (``/metrics``)."""
    app.state.metrics = metrics


def app_metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


def runtime(request: Request) -> Runtime:
    return request.app.state.gateway  # type: ignore[no-any-return]


def model_entry(rt: Runtime, model_name: str) -> ModelEntry:
    """The catalog entry of a model; 503 before the catalog loaded, 404 when unknown."""
    if not rt.catalog.loaded:
        raise UpstreamUnavailable("the model catalog has not been loaded yet")
    entry = rt.catalog.get(model_name)
    if entry is None:
        raise ModelNotFound(f"unknown model {model_name!r}")
    return entry


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a route: each status with the error body."""
    return {status: {"model": ErrorResponse} for status in statuses}


async def reload_catalog(rt: Runtime, after: str) -> None:
    """Reload the catalog after a write, so this gateway serves the change from now on."""
    try:
        await rt.catalog.reload()
    except Exception as exc:  # the listener or the periodic reload catches up
        log.warning("catalog reload after %s failed: %s: %s", after, type(exc).__name__, exc)
