"""The FastAPI app factory: wiring of settings, clients and routes; no import-time state.

``lifespan`` opens the Triton gRPC client, the Postgres pool and the catalog listener, and
closes them in reverse order. Everything the routes need is on ``app.state.gateway``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from psycopg_pool import AsyncConnectionPool

from gateway.catalog import Catalog
from gateway.config import GatewaySettings
from gateway.deps import DiscardPredictionLog, GatewayDeps, PredictionLog
from gateway.errors import GatewayError, install_error_handler
from gateway.health import HealthTracker
from gateway.ingress import IngressMiddleware
from gateway.metrics import GatewayMetrics
from gateway.prediction_log import KafkaPredictionLog
from gateway.responses import OrjsonResponse
from gateway.routes import build_router
from gateway.service import PredictionService
from gateway.spool import SpoolLockedError
from gateway.triton_client import TritonClient
from rtinfer.postgres_server import dsn
from rtinfer.settings import Settings

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


def catalog_conninfo(settings: Settings) -> str:
    """``gateway.postgres_dsn``, else the local stack's instance (its generated password)."""
    if settings.gateway.postgres_dsn is not None:
        return settings.gateway.postgres_dsn.get_secret_value()
    pg = settings.postgres
    return dsn(settings.state_dir / "postgres", pg.port, pg.host, pg.user, pg.database).conninfo


async def _connect_triton(triton: TritonClient, timeout_s: float) -> None:
    """Open the gRPC channel now rather than on the first prediction; never fatal."""
    try:
        if not await triton.is_server_ready(timeout_s):
            log.warning("triton at %s is not ready yet", triton.url)
    except GatewayError as exc:
        log.warning("triton not reachable at startup: %s", exc.message)


MAX_SPOOL_SLOTS = 64


def open_prediction_log(settings: Settings) -> PredictionLog:
    """The configured prediction log; Kafka with a spool slot of its own per worker process.

    Slots (``slot-0``, ``slot-1``, ...) are claimed by lock, so a restarted worker takes over
    a slot a previous process left and replays what it had spooled.
    """
    gw = settings.gateway
    if gw.prediction_log == "discard":
        return DiscardPredictionLog()
    bootstrap = gw.kafka_bootstrap or settings.kafka.bootstrap
    root = gw.spool_dir or settings.state_dir / "spool"
    for slot in range(MAX_SPOOL_SLOTS):
        try:
            return KafkaPredictionLog(bootstrap, spool_dir=root / f"slot-{slot}")
        except SpoolLockedError:
            continue
    raise RuntimeError(f"all {MAX_SPOOL_SLOTS} prediction-log spool slots in {root} are in use")


def create_app(settings: Settings, deps: GatewayDeps | None = None) -> FastAPI:
    """A gateway app; nothing connects until its lifespan starts."""
    deps = deps or GatewayDeps()
    gw = settings.gateway
    metrics = GatewayMetrics()
    health = HealthTracker()

    def count_error(err: GatewayError) -> None:
        metrics.errors.labels(err.code).inc()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = AsyncConnectionPool(
            catalog_conninfo(settings),
            min_size=1,
            max_size=gw.postgres_pool_size,
            open=False,
            timeout=gw.postgres_connect_timeout_s,
            kwargs={
                "autocommit": True,
                "connect_timeout": max(1, round(gw.postgres_connect_timeout_s)),
            },
            name="gateway",
            check=AsyncConnectionPool.check_connection,  # drop connections a restart broke
        )
        triton = TritonClient(gw.triton_grpc_url, metrics)
        catalog = Catalog(
            pool,
            refresh_s=gw.catalog_refresh_s,
            connect_timeout_s=gw.postgres_connect_timeout_s,
            metrics=metrics,
        )
        prediction_log = deps.prediction_log
        owned_log = prediction_log is None
        if prediction_log is None:
            # per process: librdkafka threads and the spool lock do not survive a fork
            prediction_log = open_prediction_log(settings)
        try:
            await pool.open(wait=False)
            await catalog.start(gw.catalog_startup_wait_s)
            await _connect_triton(triton, gw.triton_ready_timeout_s)
            service = PredictionService(
                catalog=catalog,
                triton=triton,
                metrics=metrics,
                health=health,
                prediction_log=prediction_log,
                default_deadline_ms=gw.default_deadline_ms,
            )
            app.state.gateway = Runtime(gw, triton, pool, catalog, service, health, metrics)
            yield
        finally:
            await catalog.close()
            await pool.close()
            await triton.close()
            if owned_log and isinstance(prediction_log, KafkaPredictionLog):
                # deliver what is queued; the rest goes to the spool, nothing is lost
                await asyncio.to_thread(prediction_log.close, 10.0)

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
    app.include_router(build_router(metrics, deps.authenticate))
    return app
