"""The FastAPI app factory: wiring of settings, clients and routes; no import-time state.

``lifespan`` opens the Triton gRPC client, the Postgres pool, the catalog listener and the
model deployer (unless one is injected), and closes them in reverse order. Everything the
routes need is on ``app.state.gateway``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI
from psycopg_pool import AsyncConnectionPool

from gateway.asyncpred.routes import AsyncPredictDoor, build_async_router
from gateway.auth.security import ApiKeyGuard
from gateway.catalog.snapshot import Catalog
from gateway.config import GatewaySettings
from gateway.errors import GatewayError, install_error_handler
from gateway.http.deps import GatewayDeps
from gateway.http.ingress import IngressMiddleware
from gateway.http.lifecycle_routes import build_lifecycle_router
from gateway.http.responses import OrjsonResponse
from gateway.http.routes import build_router
from gateway.metrics import GatewayMetrics
from gateway.serving.core import (
    catalog_conninfo,
    feature_store_url,
    health_dir,
    open_deployer,
    open_serving_core,
)
from gateway.serving.health import HealthTracker
from gateway.serving.model_health import HealthChecks
from gateway.serving.service import PredictionService
from gateway.serving.triton_client import TritonClient
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.lifecycle.deployer import Deployer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """What one app instance serves with; built in ``lifespan``."""

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


def rate_limit_redis_url(settings: Settings) -> str:
    """``gateway.redis_url``, else the local stack's Redis."""
    if settings.gateway.redis_url is not None:
        return settings.gateway.redis_url.get_secret_value()
    return settings.redis.url


@asynccontextmanager
async def _publishing(health: HealthTracker, period_s: float = 1.0) -> AsyncIterator[None]:
    """Share this worker's health counters with the other workers while the app runs."""

    async def loop() -> None:
        while True:
            try:
                await asyncio.to_thread(health.publish)
            except OSError as exc:
                log.warning("publishing health counters failed: %s", exc)
            await asyncio.sleep(period_s)

    task = asyncio.create_task(loop(), name="health-publish")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        health.forget()


def create_app(settings: Settings, deps: GatewayDeps | None = None) -> FastAPI:
    """A gateway app; nothing connects until its lifespan starts.

    Authentication: ``deps.authenticate`` when given; otherwise, with ``gateway.auth =
    "api_key"`` (the default), an :class:`ApiKeyGuard` over the catalog database and Redis.
    """
    deps = deps or GatewayDeps()
    gw = settings.gateway
    metrics = GatewayMetrics()
    health = HealthTracker(share_dir=health_dir(settings))
    authenticate = deps.authenticate
    guard: ApiKeyGuard | None = None
    if authenticate is None and gw.auth == "api_key":
        guard = ApiKeyGuard.connect(
            catalog_conninfo(settings),
            rate_limit_redis_url(settings),
            cache_ttl_s=gw.auth_cache_ttl_s,
            burst_multiplier=gw.rate_limit_burst,
        )
        authenticate = guard

    def count_error(err: GatewayError) -> None:
        metrics.errors.labels(err.code).inc()

    async_door = AsyncPredictDoor(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the serving core (pool, catalog, Triton, prediction log, service) is shared with the
        # async worker: gateway/serving/core.py
        try:
            if guard is not None:
                await guard.open()
            async with (
                open_serving_core(settings, metrics, health, deps.prediction_log) as core,
                AsyncExitStack() as owned,
            ):
                deployer = deps.deployer
                if deployer is None:
                    deployer = await owned.enter_async_context(
                        open_deployer(settings, registry=metrics.registry)
                    )
                checks = HealthChecks(
                    core.triton,
                    health,
                    feature_store_url(settings),
                    ttl_s=gw.health_check_ttl_s,
                    timeout_s=gw.triton_ready_timeout_s,
                )
                owned.push_async_callback(checks.close)
                await owned.enter_async_context(_publishing(health))
                app.state.gateway = Runtime(
                    gw,
                    core.triton,
                    core.pool,
                    core.catalog,
                    core.service,
                    health,
                    metrics,
                    deployer,
                    checks,
                )
                await async_door.open()
                app.state.async_predict = async_door
                try:
                    yield
                finally:
                    await async_door.close()
        finally:
            if guard is not None:
                await guard.close()

    app = FastAPI(
        title="rtinfer gateway",
        version="0.1.0",
        summary="Real-time fraud scoring in front of NVIDIA Triton.",
        description="Every error response has the body "
        '`{"error": {"code": "...", "message": "..."}}`.',
        lifespan=lifespan,
        default_response_class=OrjsonResponse,
    )
    install_error_handler(app, count_error)
    app.add_middleware(IngressMiddleware, max_body_bytes=gw.max_body_bytes, on_error=count_error)
    app.include_router(build_router(metrics, authenticate))
    app.include_router(build_lifecycle_router(metrics, authenticate))
    app.include_router(build_async_router(metrics, authenticate))
    return app
