"""The deployer service: MLflow webhook receiver, registry reconcile loop, version watcher.

``create_deployer_app`` builds the FastAPI app around an existing deployer and registry sync;
its lifespan starts the reconcile loop (and the watcher, when given) and stops them.
``open_deployer`` opens what the app runs on (Postgres pool, Triton repository client,
deployer, sync) and closes it; ``python -m gateway.lifecycle`` serves the two together.

``POST /hooks/mlflow`` verifies the delivery (401 when unsigned, forged or stale), records its
delivery id (200 ``duplicate`` for one seen before) and answers 202 at once; the deploy runs
in the background. ``/livez``, ``/readyz`` (Postgres reachable, loop started) and
``/metrics`` as the gateway has them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from psycopg_pool import AsyncConnectionPool
from starlette.responses import Response

from gateway.catalog.rollout_store import SyncStore
from gateway.errors import GatewayError, PayloadTooLarge, install_error_handler
from gateway.lifecycle.config import LifecycleSettings
from gateway.lifecycle.deployer import Deployer
from gateway.lifecycle.deployer import open_deployer as open_lifecycle_deployer
from gateway.lifecycle.fallback_sync import align_fallbacks
from gateway.lifecycle.mlflow_hooks import parse_event, verify_delivery
from gateway.lifecycle.mlflow_registry import MlflowRegistry
from gateway.lifecycle.registry_sync import RegistrySync, SyncMetrics
from gateway.lifecycle.triton_repo import TritonRepository
from gateway.lifecycle.watchdog import ModelWatchdog
from gateway.responses import OrjsonResponse
from gateway.settings import Settings

log = logging.getLogger(__name__)

#: MLflow's registry payloads are small; anything larger is not one
MAX_WEBHOOK_BODY_BYTES = 256 * 1024
#: shortest webhook secret accepted (HMAC keys shorter than this are guessable)
MIN_SECRET_CHARS = 16
#: how long shutdown waits for drains and unloads in progress
SHUTDOWN_SETTLE_S = 10.0


class Watcher(Protocol):
    """``gateway.lifecycle.watcher.VersionWatcher``."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class DeployerRuntime:
    """Everything the deployer service runs on, opened together by ``open_deployer``."""

    pool: AsyncConnectionPool
    deployer: Deployer
    sync: RegistrySync
    metrics_registry: CollectorRegistry
    watcher: Watcher | None
    watchdog: Watcher | None = None


def load_watcher(settings: Settings, deployer: Deployer) -> Watcher:
    """The repository watcher; a missing ``watcher`` module is a deployment error."""
    try:
        from gateway.lifecycle.watcher import VersionWatcher
    except ModuleNotFoundError as exc:
        if exc.name != "gateway.lifecycle.watcher":
            raise
        raise RuntimeError(
            "lifecycle.watch is on but gateway/lifecycle/watcher.py is not installed; "
            "install it or set RTINFER_LIFECYCLE__WATCH=false"
        ) from exc
    return VersionWatcher(settings, deployer)  # type: ignore[no-any-return]


@asynccontextmanager
async def open_deployer(settings: Settings) -> AsyncIterator[DeployerRuntime]:
    """The deployer (as the gateway opens it), registry sync and watcher, with one registry."""
    lc, gw = settings.lifecycle, settings.gateway
    registry = CollectorRegistry()
    async with open_lifecycle_deployer(
        settings, wait_s=gw.postgres_connect_timeout_s * 3, registry=registry
    ) as deployer:
        try:
            await align_fallbacks(deployer.pool, deployer.repository, settings)
        except Exception:  # the catalog keeps serving as it is; the next start retries
            log.exception("aligning fallbacks with the training statistics failed")
        sync = RegistrySync(
            lc,
            deployer,
            SyncStore(deployer.pool),
            MlflowRegistry(settings.mlflow.tracking_uri),
            SyncMetrics(registry),
        )
        watcher = load_watcher(settings, deployer) if lc.watch else None
        if not lc.watchdog:
            yield DeployerRuntime(deployer.pool, deployer, sync, registry, watcher)
            return
        probes = TritonRepository(gw.triton_grpc_url)
        try:
            watchdog = ModelWatchdog(
                probes,
                deployer.pool,
                registry,
                deployer.repository,
                interval_s=lc.watchdog_interval_s,
                probe_timeout_s=lc.watchdog_probe_timeout_s,
            )
            yield DeployerRuntime(deployer.pool, deployer, sync, registry, watcher, watchdog)
        finally:
            await probes.close()


router = APIRouter()


@router.post(
    "/hooks/mlflow",
    status_code=202,
    summary="MLflow model registry webhook: 202 accepted, 200 duplicate/ignored, 401",
)
async def mlflow_hook(request: Request) -> Response:
    state: _State = request.app.state.rollout
    metrics = state.sync.metrics
    body = await request.body()
    try:
        if len(body) > MAX_WEBHOOK_BODY_BYTES:
            raise PayloadTooLarge(f"webhook body over {MAX_WEBHOOK_BODY_BYTES} bytes")
        delivery_id = verify_delivery(
            state.secret,
            request.headers,
            body,
            now=time.time(),
            max_skew_s=state.settings.lifecycle.webhook_max_skew_s,
        )
        event = parse_event(delivery_id, body)
    except GatewayError as exc:
        metrics.deliveries.labels("rejected" if exc.status == 401 else "invalid").inc()
        raise
    answer: dict[str, Any] = {"delivery_id": delivery_id, "event": event.event}
    if not await state.sync.store.record_delivery(event):
        metrics.deliveries.labels("duplicate").inc()
        return OrjsonResponse({"status": "duplicate", **answer}, status_code=200)
    if not event.acted_on:
        metrics.deliveries.labels("ignored").inc()
        return OrjsonResponse({"status": "ignored", **answer}, status_code=200)
    state.sync.submit(event)
    metrics.deliveries.labels("accepted").inc()
    log.info(
        "accepted MLflow delivery %s: %s %s version %s alias %s",
        delivery_id,
        event.event,
        event.model,
        event.version,
        event.alias,
    )
    return OrjsonResponse({"status": "accepted", **answer}, status_code=202)


@router.get("/livez", summary="The process is up")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="200 once the reconcile loop runs and Postgres answers")
async def readyz(request: Request) -> Response:
    state: _State = request.app.state.rollout
    checks: dict[str, str] = {"sync": "started" if state.started else "not started"}
    try:
        await state.sync.store.ping()
        checks["postgres"] = "ok"
    except Exception as exc:
        checks["postgres"] = str(exc) or type(exc).__name__
    ready = state.started and checks["postgres"] == "ok"
    return OrjsonResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    state: _State = request.app.state.rollout
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


@dataclass
class _State:
    settings: Settings
    secret: str
    sync: RegistrySync
    registry: CollectorRegistry
    started: bool = False


def webhook_secret(lifecycle: LifecycleSettings) -> str:
    """The configured webhook secret; the deployer does not start without a usable one."""
    configured = lifecycle.webhook_secret
    secret = configured.get_secret_value() if configured is not None else ""
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(
            "lifecycle.webhook_secret must be set to at least "
            f"{MIN_SECRET_CHARS} characters (RTINFER_LIFECYCLE__WEBHOOK_SECRET): without it "
            "forged MLflow deliveries cannot be told apart; `rtinfer stack up` generates one"
        )
    return secret


def create_deployer_app(
    settings: Settings,
    deployer: Deployer,
    sync: RegistrySync,
    *,
    metrics_registry: CollectorRegistry,
    watcher: Watcher | None = None,
    watchdog: Watcher | None = None,
) -> FastAPI:
    """The deployer service app over ``deployer`` and ``sync`` (which uses ``deployer``).

    The lifespan starts the reconcile loop and ``watcher`` and stops them, waiting for
    webhook work in progress; it does not close ``deployer`` (``open_deployer`` does).
    """
    secret = webhook_secret(settings.lifecycle)
    state = _State(settings, secret, sync, metrics_registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sync.start()
        background = [w for w in (watcher, watchdog) if w is not None]
        try:
            for task in background:
                await task.start()
            try:
                state.started = True
                yield
            finally:
                state.started = False
                for task in reversed(background):
                    await task.close()
        finally:
            await sync.close()
            try:  # drains/unloads started by this process: bounded, the stack stops us
                await deployer.wait_settled(timeout_s=SHUTDOWN_SETTLE_S)
            except TimeoutError:
                log.warning(
                    "deploys still draining after %.0fs; stopping anyway", SHUTDOWN_SETTLE_S
                )

    app = FastAPI(
        title="rtinfer deployer",
        version="0.1.0",
        summary="Rolls MLflow model versions out to Triton and the catalog.",
        lifespan=lifespan,
        default_response_class=OrjsonResponse,
    )
    app.state.rollout = state
    install_error_handler(app)
    app.include_router(router)
    return app
