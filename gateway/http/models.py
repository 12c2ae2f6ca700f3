"""The catalog doors: list models, show one with its history, register and remove shadows."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from gateway.auth.guards import AdminFor, actor_of, authenticated
from gateway.catalog import shadows
from gateway.catalog.records import Deployment
from gateway.catalog.snapshot import ModelEntry
from gateway.errors import InvalidRequest, ModelNotReady
from gateway.http.context import error_responses, model_entry, reload_catalog, runtime
from gateway.http.lifecycle import lifecycle_history
from gateway.schemas import (
    CatalogName,
    DeploymentInfo,
    FallbackInfo,
    ModelInfo,
    ModelList,
    ShadowRemoval,
    ShadowRequest,
)
from gateway.serving.triton_client import TritonClient

router = APIRouter()
shadow_admin = AdminFor("changing shadow deployments")


@router.get(
    "/models",
    response_model=ModelList,
    responses=error_responses(401, 429),
    dependencies=[Depends(authenticated)],
    summary="Every model of the catalog with its active deployments",
)
async def list_models(request: Request) -> ModelList:
    snapshot = runtime(request).catalog.snapshot()
    return ModelList(
        models=[model_info(entry) for entry in snapshot.models.values()],
        catalog_loaded_at=snapshot.loaded_at,
    )


@router.get(
    "/models/{model_name}",
    response_model=ModelInfo,
    responses=error_responses(401, 404, 429, 503),
    dependencies=[Depends(authenticated)],
    summary="One model's active deployments and its latest lifecycle events",
    description="history: the last 10 lifecycle events of a model the deployer manages "
    "(deploys, failed deploys with their step and error, promotions, rollbacks), newest "
    "first; null when the model is not managed or the history cannot be read.",
)
async def get_model(model_name: str, request: Request) -> ModelInfo:
    rt = runtime(request)
    info = model_info(model_entry(rt, model_name))
    info.history = await lifecycle_history(rt, model_name)
    return info


@router.post(
    "/models/{model_name}/shadow",
    status_code=201,
    response_model=DeploymentInfo,
    responses=error_responses(401, 403, 404, 409, 422, 429, 503),
    dependencies=[Depends(shadow_admin)],
    summary="Register a shadow deployment of a model (admin)",
    description="The shadow receives a sample of the model's requests after each response "
    "is computed, never answers, and its predictions go to the prediction log (topic "
    "predictions-shadow) with the production answer. 404: no active production "
    "deployment; 409: an active shadow of this version exists; 422: serving_endpoint not "
    "READY in Triton. The answer is the new deployment, already in this gateway's catalog.",
)
async def register_shadow(model_name: str, body: ShadowRequest, request: Request) -> DeploymentInfo:
    rt = runtime(request)
    await shadows.check_can_register(rt.pool, model_name, body.model_version)
    await check_endpoint_ready(rt.triton, body.serving_endpoint, rt.settings.triton_ready_timeout_s)
    shadow = await shadows.register_shadow(rt.pool, model_name, body, actor_of(request))
    await reload_catalog(rt, "a shadow change")
    return _shadow_info(shadow)


@router.delete(
    "/models/{model_name}/shadow",
    response_model=ShadowRemoval,
    responses=error_responses(401, 403, 404, 422, 429, 503),
    dependencies=[Depends(shadow_admin)],
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
    rt = runtime(request)
    removed = await shadows.remove_shadows(rt.pool, model_name, model_version, actor_of(request))
    await reload_catalog(rt, "a shadow change")
    return ShadowRemoval(model_name=model_name, removed=[_shadow_info(d) for d in removed])


def _shadow_info(shadow: Deployment) -> DeploymentInfo:
    return _deployment_info(ModelEntry.build(shadow.model_name, [shadow]), shadow)


def model_info(entry: ModelEntry) -> ModelInfo:
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


async def check_endpoint_ready(triton: TritonClient, endpoint: str, timeout_s: float) -> None:
    """422 unless Triton has ``endpoint`` READY; Triton unreachable stays a 503."""
    states = [s for s in await triton.model_states(timeout_s) if s.name == endpoint]
    if not states:
        raise InvalidRequest(
            f"serving_endpoint: Triton has no model {endpoint!r} in its repository"
        )
    if not any(s.state == "READY" for s in states):
        found = "; ".join(f"version {s.version or '?'}: {s.state or 'unknown'}" for s in states)
        reason = next((s.reason for s in states if s.reason), "")
        raise InvalidRequest(
            f"serving_endpoint: Triton model {endpoint!r} is not READY ({found})"
            + (f": {reason}" if reason else "")
        )
    try:
        ready = await triton.is_model_ready(endpoint, timeout_s)
    except ModelNotReady:
        ready = False
    if not ready:
        raise InvalidRequest(f"serving_endpoint: Triton model {endpoint!r} is not ready")
