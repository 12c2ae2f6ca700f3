"""Health doors: per-model serving health, liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from gateway.auth.guards import authenticated
from gateway.errors import GatewayError
from gateway.http.context import app_metrics, error_responses, model_entry, runtime
from gateway.responses import OrjsonResponse
from gateway.schemas import ModelHealth, ReadyStatus

router = APIRouter()


@router.get(
    "/predict/{model_name}/health",
    response_model=ModelHealth,
    responses=error_responses(401, 404, 429, 503),
    dependencies=[Depends(authenticated)],
    summary="Serving health of one model (for people and alerts; not a load-balancer check)",
    description="status ok, degraded or down with the reasons. Per deployment: Triton "
    "readiness and loaded versions, the scorer versions that answer, a probe row through "
    "its pipeline and whether the gateway fails fast on it. The feature store is PINGed; "
    "counters of the last minute are summed over every gateway worker. Probes and the "
    "PING run at most once per gateway.health_check_ttl_s.",
)
async def model_health(model_name: str, request: Request) -> ModelHealth:
    rt = runtime(request)
    return await rt.checks.model(model_entry(rt, model_name))


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
    rt = runtime(request)
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
    status = ReadyStatus(ready=catalog_ok and triton_ok, catalog=catalog_state, triton=triton_state)
    return OrjsonResponse(status.model_dump(), status_code=200 if status.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(request: Request) -> Response:
    metrics = app_metrics(request)
    return Response(metrics.render(), media_type=metrics.content_type)
