"""The FastAPI app factory: wiring of settings, clients and routes; no import-time state.

The lifespan opens the serving core (Triton client, Postgres pool, catalog, prediction log),
the model deployer (unless one is injected), the per-model health checks and the async
door, and closes them in reverse order. Everything the routes need is on
``app.state.gateway`` (:class:`gateway.http.context.Runtime`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from gateway.asyncpred.door import AsyncPredictDoor
from gateway.auth.guards import Authenticate, install_auth
from gateway.auth.security import ApiKeyGuard
from gateway.catalog.dsn import catalog_conninfo
from gateway.errors import GatewayError, install_error_handler
from gateway.http import async_predict, feedback, health, lifecycle, models, predict
from gateway.http.context import Runtime, install_metrics
from gateway.http.deps import GatewayDeps
from gateway.http.fast_predict import FastPredict
from gateway.http.ingress import IngressMiddleware
from gateway.lifecycle.deployer import open_deployer
from gateway.metrics import GatewayMetrics
from gateway.responses import OrjsonResponse
from gateway.serving.core import ServingCore, feature_store_url, health_dir, open_serving_core
from gateway.serving.health import HealthTracker
from gateway.serving.model_health import HealthChecks
from gateway.settings import Settings
from gateway.store.feedback import FeedbackDoor
from gateway.store.reader import StoreReader

log = logging.getLogger(__name__)

ROUTERS = (
    predict.router,
    models.router,
    health.router,
    lifecycle.router,
    async_predict.router,
    feedback.router,
)


def rate_limit_redis_url(settings: Settings) -> str:
    """``gateway.redis_url``, else the local stack's Redis."""
    if settings.gateway.redis_url is not None:
        return settings.gateway.redis_url.get_secret_value()
    return settings.redis.url


@dataclass(frozen=True)
class _Parts:
    """What ``create_app`` builds before the app starts; the lifespan opens the rest."""

    settings: Settings
    deps: GatewayDeps
    metrics: GatewayMetrics
    health: HealthTracker
    guard: ApiKeyGuard | None
    async_door: AsyncPredictDoor
    feedback: FeedbackDoor
    store_reader: StoreReader


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


async def _open_runtime(parts: _Parts, core: ServingCore, owned: AsyncExitStack) -> Runtime:
    """The deployer and health checks beside the serving core, as the routes' runtime."""
    settings, gw = parts.settings, parts.settings.gateway
    deployer = parts.deps.deployer
    if deployer is None:
        deployer = await owned.enter_async_context(
            open_deployer(settings, registry=parts.metrics.registry)
        )
    checks = HealthChecks(
        core.triton,
        parts.health,
        feature_store_url(settings),
        ttl_s=gw.health_check_ttl_s,
        timeout_s=gw.triton_ready_timeout_s,
    )
    owned.push_async_callback(checks.close)
    await owned.enter_async_context(_publishing(parts.health))
    return Runtime(
        gw,
        core.triton,
        core.pool,
        core.catalog,
        core.service,
        parts.health,
        parts.metrics,
        deployer,
        checks,
    )


def _lifespan(parts: _Parts) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as owned:
            if parts.guard is not None:
                await parts.guard.open()
                owned.push_async_callback(parts.guard.close)
            core = await owned.enter_async_context(
                open_serving_core(
                    parts.settings, parts.metrics, parts.health, parts.deps.prediction_log
                )
            )
            app.state.gateway = await _open_runtime(parts, core, owned)
            await parts.async_door.open()
            owned.push_async_callback(parts.async_door.close)
            app.state.async_predict = parts.async_door
            owned.push_async_callback(parts.feedback.close)
            owned.push_async_callback(parts.store_reader.close)
            app.state.feedback = parts.feedback
            app.state.store_reader = parts.store_reader
            yield

    return lifespan


def _api_key_guard(settings: Settings) -> ApiKeyGuard:
    gw = settings.gateway
    return ApiKeyGuard.connect(
        catalog_conninfo(settings),
        rate_limit_redis_url(settings),
        cache_ttl_s=gw.auth_cache_ttl_s,
        burst_multiplier=gw.rate_limit_burst,
        lease_s=gw.rate_limit_lease_s,
    )


def create_app(settings: Settings, deps: GatewayDeps | None = None) -> FastAPI:
    """A gateway app; nothing connects until its lifespan starts.

    Authentication: ``deps.authenticate`` when given; otherwise, with ``gateway.auth =
    "api_key"`` (the default), an :class:`ApiKeyGuard` over the catalog database and Redis.
    """
    deps = deps or GatewayDeps()
    metrics = GatewayMetrics()
    authenticate: Authenticate | None = deps.authenticate
    guard = None
    if authenticate is None and settings.gateway.auth == "api_key":
        authenticate = guard = _api_key_guard(settings)
    health_tracker = HealthTracker(share_dir=health_dir(settings))
    store = settings.store
    parts = _Parts(
        settings,
        deps,
        metrics,
        health_tracker,
        guard,
        AsyncPredictDoor(settings, metrics),
        FeedbackDoor(settings.kafka_bootstrap(), store.labels_topic, store.feedback_timeout_s),
        StoreReader(settings.store_url(), store.query_timeout_s),
    )

    def count_error(err: GatewayError) -> None:
        metrics.errors.labels(err.code).inc()

    app = FastAPI(
        title="rtinfer gateway",
        version="0.1.0",
        summary="Real-time fraud scoring in front of NVIDIA Triton.",
        description="Every error response has the body "
        '`{"error": {"code": "...", "message": "..."}}`.',
        lifespan=_lifespan(parts),
        default_response_class=OrjsonResponse,
    )
    install_metrics(app, metrics)
    install_auth(app, metrics, authenticate)
    render_error = install_error_handler(app, count_error)
    app.add_middleware(FastPredict, render_error=render_error)
    app.add_middleware(  # outermost: the body limit applies to the fast path too
        IngressMiddleware, max_body_bytes=settings.gateway.max_body_bytes, on_error=count_error
    )
    for router in ROUTERS:
        app.include_router(router)
    return app
