"""The serving core every door runs on: catalog, Triton client, prediction log, service.

``open_serving_core`` builds and tears down the pieces behind ``PredictionService`` in one
place; the REST app's lifespan and the async worker both use it, so both doors predict
with the same objects built the same way.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool

from gateway.catalog.dsn import catalog_pool
from gateway.catalog.snapshot import Catalog
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.serving.health import HealthTracker
from gateway.serving.service import PredictionService
from gateway.serving.triton_client import TritonClient
from gateway.settings import Settings
from python_backend.contract import CONTEXT_FEATURES
from python_backend.predlog.sink import DiscardPredictionLog, PredictionLog
from python_backend.predlog.slots import open_in_free_slot
from python_backend.predlog.writer import KafkaPredictionLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingCore:
    """What ``PredictionService`` runs on, opened together and closed together."""

    pool: AsyncConnectionPool
    triton: TritonClient
    catalog: Catalog
    service: PredictionService


def result_store_url(settings: Settings) -> str:
    """Async results: ``async_predict.redis_url``, else the gateway's Redis, else the stack's."""
    gw = settings.gateway
    url = gw.async_predict.redis_url or gw.redis_url
    return url.get_secret_value() if url is not None else settings.redis.url


def feature_store_url(settings: Settings) -> str:
    """``gateway.feature_store_url``, else the local stack's Redis (what the assembler reads)."""
    url = settings.gateway.feature_store_url
    return url.get_secret_value() if url is not None else settings.redis.url


def health_dir(settings: Settings) -> Path:
    """Where the workers of this gateway share their health counters."""
    gw = settings.gateway
    return gw.health_dir or settings.state_dir / "gateway" / f"health-{gw.port}"


def open_prediction_log(
    settings: Settings, registry: CollectorRegistry | None = None
) -> PredictionLog:
    """The configured prediction log; Kafka with a spool slot of its own per worker process.

    Slots (``slot-0``, ``slot-1``, ...) are claimed by lock, so a restarted worker takes over
    a slot a previous process left and replays what it had spooled. Its counters and spool
    gauges (``rtinfer_prediction_log_*``) are exported through ``registry``.
    """
    gw = settings.gateway
    if gw.prediction_log == "discard":
        return DiscardPredictionLog()
    bootstrap = settings.kafka_bootstrap()
    return open_in_free_slot(
        settings.spool_root(),
        "slot",
        lambda slot: KafkaPredictionLog(
            bootstrap,
            spool_dir=slot,
            linger_ms=gw.prediction_log_linger_ms,
            registry=registry,
        ),
    )


async def connect_triton(triton: TritonClient, timeout_s: float) -> None:
    """Open the gRPC channel now rather than on the first prediction; never fatal."""
    try:
        if not await triton.is_server_ready(timeout_s):
            log.warning("triton at %s is not ready yet", triton.url)
    except GatewayError as exc:
        log.warning("triton not reachable at startup: %s", exc.message)


async def warm_up(triton: TritonClient, catalog: Catalog, timeout_s: float) -> None:
    """One inference per serving endpoint, so the first caller does not pay for channel and
    stream set-up (tens of ms, enough to miss a 100 ms deadline); never fatal."""
    models = catalog.snapshot().models.values()
    endpoints = {d.serving_endpoint for entry in models for d in entry.deployments}
    for endpoint in sorted(endpoints):
        try:
            await triton.infer(
                endpoint,
                "warmup",
                "warmup",
                [math.nan] * len(CONTEXT_FEATURES),
                request_id="warmup",
                timeout_s=timeout_s,
            )
        except GatewayError as exc:
            log.info("warm-up of %s failed: %s", endpoint, exc.message)


@asynccontextmanager
async def open_serving_core(
    settings: Settings,
    metrics: GatewayMetrics,
    health: HealthTracker,
    prediction_log: PredictionLog | None = None,
    *,
    default_deadline_ms: int | None = None,
    door: str = "gateway",
) -> AsyncIterator[ServingCore]:
    """Postgres pool, catalog (first load awaited), Triton client (warmed up), prediction log
    (the configured one unless given) and the service over them; closed in reverse order.

    Call it per process: librdkafka threads and the spool lock do not survive a fork.
    """
    gw = settings.gateway
    pool = catalog_pool(settings, "gateway", gw.postgres_pool_size)
    triton = TritonClient(
        gw.triton_grpc_url,
        metrics,
        max_calls=gw.triton_max_calls,
        max_batch_rows=gw.triton_max_batch_rows,
        call_grace_s=gw.triton_call_grace_ms / 1000.0,
    )
    catalog = Catalog(
        pool,
        refresh_s=gw.catalog_refresh_s,
        connect_timeout_s=gw.postgres_connect_timeout_s,
        metrics=metrics,
    )
    owned_log = prediction_log is None
    if prediction_log is None:
        prediction_log = open_prediction_log(settings, metrics.registry)
    service: PredictionService | None = None
    try:
        await pool.open(wait=False)
        await catalog.start(gw.catalog_startup_wait_s)
        await connect_triton(triton, gw.triton_ready_timeout_s)
        await warm_up(triton, catalog, gw.triton_ready_timeout_s)
        service = PredictionService(
            catalog=catalog,
            triton=triton,
            metrics=metrics,
            health=health,
            prediction_log=prediction_log,
            default_deadline_ms=default_deadline_ms or gw.default_deadline_ms,
            shadow_timeout_ms=gw.shadow_timeout_ms,
            shadow_max_in_flight=gw.shadow_max_in_flight,
            max_in_flight=gw.max_in_flight,
            door=door,
        )
        yield ServingCore(pool, triton, catalog, service)
    finally:
        if service is not None:
            await service.close()  # shadow calls in flight, before Triton and the log close
        await catalog.close()
        await pool.close()
        await triton.close()
        if owned_log and isinstance(prediction_log, KafkaPredictionLog):
            # deliver what is queued; the rest goes to the spool, nothing is lost
            await asyncio.to_thread(prediction_log.close, 10.0)
