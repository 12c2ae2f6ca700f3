"""The REST door: HTTP routes over the prediction service and the catalog."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from gateway.auth.guards import actor_of, admin_guard, auth_guard
from gateway.catalog import shadows
from gateway.catalog.records import Deployment
from gateway.catalog.snapshot import ModelEntry
from gateway.errors import GatewayError, ModelNotFound, UpstreamUnavailable
from gateway.http.deps import Authenticate
from gateway.http.ingress import RECEIVED_AT
from gateway.http.lifecycle_routes import lifecycle_history
from gateway.http.responses import OrjsonResponse
from gateway.metrics import GatewayMetrics
from gateway.schemas import (
    DEGRADED_HEADER,
    REQUEST_ID_HEADER,
    CatalogName,
    DeploymentInfo,
    ErrorResponse,
    FallbackInfo,
    ModelHealth,
    ModelInfo,
    ModelList,
    PredictRequest,
    PredictResponse,
    ReadyStatus,
    ShadowRemoval,
    ShadowRequest,
    new_request_id,
    valid_request_id,
)

if TYPE_CHECKING:
    from gateway.http.app import Runtime

log = logging.getLogger(__name__)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


def _runtime(request: Request) -> Runtime:
    return request.app.state.gateway  # type: ignore[no-any-return]


def build_router(metrics: GatewayMetrics, authenticate: Authenticate | None) -> APIRouter:
    router = APIRouter()
    guarded: list[Any] = []
    auth = auth_guard(metrics, authenticate)
    admin = admin_guard(metrics, authenticate, "changing shadow deployments")

    if authenticate is not None:
        guarded = [Depends(auth)]

    @router.post(
        "/predict/{model_name}",
        response_model=PredictResponse,
        responses=_errors(401, 404, 413, 422, 429, 503, 504),
        dependencies=guarded,
        summary="Score one transaction with a catalog model",
        description=f"Routes to the user's sticky traffic arm. Response headers: "
        f"`{REQUEST_ID_HEADER}` (echoed or generated), `{DEGRADED_HEADER}: true` when degraded. "
        "When Triton is unavailable, the model not ready or the deadline spent, a deployment "
        "with a fallback_config answers 200 with its fallback (degraded) instead of 503/504.",
    )
    async def predict(model_name: str, body: PredictRequest, request: Request) -> Response:
        request_id = (
            body.request_id
            or valid_request_id(request.headers.get(REQUEST_ID_HEADER))
            or new_request_id()
        )
        request.state.request_id = request_id
        result = await _runtime(request).service.predict(
            model_name,
            body,
            request_id=request_id,
            received_at=getattr(request.state, RECEIVED_AT, None),
        )
        headers = {REQUEST_ID_HEADER: request_id}
        if result.degraded:
            headers[DEGRADED_HEADER] = "true"
        return OrjsonResponse(result.model_dump(), headers=headers)

    @router.get(
        "/models",
        response_model=ModelList,
        responses=_errors(401, 429),
        dependencies=guarded,
        summary="Every model of the catalog with its active deployments",
    )
    async def list_models(request: Request) -> ModelList:
        snapshot = _runtime(request).catalog.snapshot()
        return ModelList(
            models=[_model_info(entry) for entry in snapshot.models.values()],
            catalog_loaded_at=snapshot.loaded_at,
        )

    @router.get(
        "/models/{model_name}",
        response_model=ModelInfo,
        responses=_errors(401, 404, 429, 503),
        dependencies=guarded,
        summary="One model's active deployments and its latest lifecycle events",
        description="history: the last 10 lifecycle events of a model the deployer manages "
        "(deploys, failed deploys with their step and error, promotions, rollbacks), newest "
        "first; null when the model is not managed or the history cannot be read.",
    )
    async def get_model(model_name: str, request: Request) -> ModelInfo:
        rt = _runtime(request)
        info = _model_info(_entry(rt, model_name))
        info.history = await lifecycle_history(rt, model_name)
        return info

    @router.post(
        "/models/{model_name}/shadow",
        status_code=201,
        response_model=DeploymentInfo,
        responses=_errors(401, 403, 404, 409, 422, 429, 503),
        dependencies=[Depends(admin)],
        summary="Register a shadow deployment of a model (admin)",
        description="The shadow receives a sample of the model's requests after each response "
        "is computed, never answers, and its predictions go to the prediction log (topic "
        "predictions-shadow) with the production answer. 404: no active production "
        "deployment; 409: an active shadow of this version exists; 422: serving_endpoint not "
        "READY in Triton. The answer is the new deployment, already in this gateway's catalog.",
    )
    async def register_shadow(
        model_name: str, body: ShadowRequest, request: Request
    ) -> DeploymentInfo:
        rt = _runtime(request)
        await shadows.check_can_register(rt.pool, model_name, body.model_version)
        await shadows.check_endpoint_ready(
            rt.triton, body.serving_endpoint, rt.settings.triton_ready_timeout_s
        )
        shadow = await shadows.register_shadow(rt.pool, model_name, body, actor_of(request))
        await _reload(rt)
        return _shadow_info(shadow)

    @router.delete(
        "/models/{model_name}/shadow",
        response_model=ShadowRemoval,
        responses=_errors(401, 403, 404, 422, 429, 503),
        dependencies=[Depends(admin)],
        summary="Remove a model's shadow deployments (admin)",
        description="Deactivates every active shadow of the model, or only that of "
        "model_version. 404 shadow_not_found when there is none.",
    )
    async def remove_shadow(
        model_name: str,
        request: Request,
        model_version: Annotated[
            CatalogName | None, Query(description="Remove only this version's shadow.")
        ] = None,
    ) -> ShadowRemoval:
        rt = _runtime(request)
        removed = await shadows.remove_shadows(
            rt.pool, model_name, model_version, actor_of(request)
        )
        await _reload(rt)
        return ShadowRemoval(model_name=model_name, removed=[_shadow_info(d) for d in removed])

    @router.get(
        "/predict/{model_name}/health",
        response_model=ModelHealth,
        responses=_errors(401, 404, 429, 503),
        dependencies=guarded,
        summary="Serving health of one model (for people and alerts; not a load-balancer check)",
        description="status ok, degraded or down with the reasons. Per deployment: Triton "
        "readiness and loaded versions, the scorer versions that answer, a probe row through "
        "its pipeline and whether the gateway fails fast on it. The feature store is PINGed; "
        "counters of the last minute are summed over every gateway worker. Probes and the "
        "PING run at most once per gateway.health_check_ttl_s.",
    )
    async def model_health(model_name: str, request: Request) -> ModelHealth:
        rt = _runtime(request)
        return await rt.checks.model(_entry(rt, model_name))

    @router.get("/livez", summary="The process is up")
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/readyz",
        response_model=ReadyStatus,
        responses={503: {"model": ReadyStatus, "description": "Not ready, with the reasons"}},
        summary="200 once the catalog is loaded and Triton is ready, else 503",
    )
    async def readyz(request: Request) -> Response:
        rt = _runtime(request)
        catalog = rt.catalog
        catalog_ok = catalog.loaded
        if catalog_ok:
            catalog_state = f"loaded ({len(catalog.snapshot().models)} models)"
        else:
            catalog_state = f"not loaded: {catalog.last_error or 'loading'}"
        try:
            triton_ok = await rt.triton.is_server_ready(rt.settings.triton_ready_timeout_s)
            triton_state = "ready" if triton_ok else "not ready"
        except GatewayError as exc:
            triton_ok, triton_state = False, exc.message
        status = ReadyStatus(
            ready=catalog_ok and triton_ok, catalog=catalog_state, triton=triton_state
        )
        return OrjsonResponse(status.model_dump(), status_code=200 if status.ready else 503)

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return router


async def _reload(rt: Runtime) -> None:
    """Reload the catalog after a write, so this gateway serves the change from now on."""
    try:
        await rt.catalog.reload()
    except Exception as exc:  # the listener or the periodic reload catches up
        log.warning("catalog reload after a shadow change failed: %s: %s", type(exc).__name__, exc)


def _shadow_info(shadow: Deployment) -> DeploymentInfo:
    return _deployment_info(ModelEntry.build(shadow.model_name, [shadow]), shadow)


def _entry(rt: Runtime, model_name: str) -> ModelEntry:
    if not rt.catalog.loaded:
        raise UpstreamUnavailable("the model catalog has not been loaded yet")
    entry = rt.catalog.get(model_name)
    if entry is None:
        raise ModelNotFound(f"unknown model {model_name!r}")
    return entry


def _model_info(entry: ModelEntry) -> ModelInfo:
    return ModelInfo(
        model_name=entry.name,
        deployments=[_deployment_info(entry, d) for d in entry.deployments],
    )


def _deployment_info(entry: ModelEntry, d: Deployment) -> DeploymentInfo:
    fallback = d.fallback
    return DeploymentInfo(
        deployment_id=d.deployment_id,
        model_version=d.model_version,
        serving_endpoint=d.serving_endpoint,
        role=entry.routing.role(d),
        traffic_pct=d.traffic_pct,
        is_shadow=d.is_shadow,
        shadow_sample_pct=d.shadow_sample_pct,
        feature_groups=list(d.feature_groups),
        fallback=(
            FallbackInfo(type=fallback.type, score=fallback.score, threshold=fallback.threshold)
            if fallback is not None
            else None
        ),
        deployed_at=d.deployed_at,
    )
