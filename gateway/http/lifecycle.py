"""Admin routes over the model lifecycle: promote, canary, rollback (admin API key required).

Each route runs the one swap procedure of ``gateway/lifecycle/deployer.py`` (trigger
``admin``, the caller's key id as actor) and answers its outcome; the deployer's typed errors
(404 ``model_not_managed``, 409 ``nothing_to_do``, 422 ``artifact_invalid`` /
``smoke_test_failed``, 502 ``model_load_failed``, 503, 504) are rendered by the gateway's one
error handler. The catalog switch reaches every gateway by NOTIFY; this one also reloads at
once, so its next request already routes to the new deployment.

``GET /models/{model_name}`` shows a managed model's latest history rows through
:func:`lifecycle_history`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated

import psycopg
from fastapi import APIRouter, Body, Depends, Path, Request
from psycopg_pool import PoolTimeout

from gateway.auth.guards import AdminFor, actor_of
from gateway.catalog.shadows import CatalogUnavailable
from gateway.http.context import Runtime, error_responses, reload_catalog, runtime
from gateway.schemas import (
    CanaryRequest,
    DeployOutcome,
    LifecycleEvent,
    PromoteRequest,
)

if TYPE_CHECKING:
    from gateway.catalog.swaps import HistoryEntry
    from gateway.lifecycle.deployer import Deployer, Outcome

log = logging.getLogger(__name__)

TRIGGER = "admin"
#: history rows shown by ``GET /models/{model_name}``
HISTORY_LIMIT = 10

ModelName = Annotated[
    str,
    Path(
        pattern=r"^[A-Za-z0-9._-]{1,128}$",
        description="A model the lifecycle manages, e.g. fraud_xgb.",
    ),
]

router = APIRouter()
lifecycle_admin = AdminFor("changing model versions")
RESPONSES = error_responses(401, 403, 404, 409, 422, 429, 502, 503, 504)


@router.post(
    "/models/{model_name}/promote",
    response_model=DeployOutcome,
    responses=RESPONSES,
    dependencies=[Depends(lifecycle_admin)],
    summary="Make a version the model's champion (admin)",
    description="The named version (loaded, smoke-tested and switched to if it does not "
    "serve yet), or without a body the model's active canary, takes all traffic; the "
    "replaced version is unloaded after the drain (drain_until). 409 nothing_to_do: no "
    "canary to promote.",
)
async def promote(
    model_name: ModelName,
    request: Request,
    body: Annotated[PromoteRequest | None, Body()] = None,
) -> DeployOutcome:
    version = body.version if body is not None else None
    actor = actor_of(request)
    return await _change(
        request, lambda d: d.promote(model_name, version, trigger=TRIGGER, actor=actor)
    )


@router.post(
    "/models/{model_name}/canary",
    response_model=DeployOutcome,
    responses=RESPONSES,
    dependencies=[Depends(lifecycle_admin)],
    summary="Serve a version to a share of the model's traffic (admin)",
    description="Loads and smoke-tests the version if needed, then gives it traffic_pct "
    "of the requests (sticky per user) beside the champion.",
)
async def canary(model_name: ModelName, body: CanaryRequest, request: Request) -> DeployOutcome:
    actor = actor_of(request)
    return await _change(
        request,
        lambda d: d.canary(
            model_name, body.version, body.traffic_pct, trigger=TRIGGER, actor=actor
        ),
    )


@router.post(
    "/models/{model_name}/rollback",
    response_model=DeployOutcome,
    responses=RESPONSES,
    dependencies=[Depends(lifecycle_admin)],
    summary="End the model's canary or shadow, else return to its previous champion (admin)",
    description="409 nothing_to_do when there is neither a trial to end nor an earlier "
    "version to return to.",
)
async def rollback(model_name: ModelName, request: Request) -> DeployOutcome:
    actor = actor_of(request)
    return await _change(request, lambda d: d.rollback(model_name, trigger=TRIGGER, actor=actor))


async def lifecycle_history(rt: Runtime, model_name: str) -> list[LifecycleEvent] | None:
    """The model's last history rows, newest first; ``None`` when the model is not managed or
    the history cannot be read (the caller's answer does not depend on it)."""
    deployer = rt.deployer
    if model_name not in deployer.managed_models:
        return None
    try:
        entries = await asyncio.wait_for(
            deployer.history(model_name, HISTORY_LIMIT), rt.settings.postgres_connect_timeout_s
        )
        return [_event(e) for e in entries]
    except Exception as exc:  # shown as null; the deployments above are still answered
        log.warning("history of %s unavailable: %s: %s", model_name, type(exc).__name__, exc)
        return None


async def _change(
    request: Request, change: Callable[[Deployer], Awaitable[Outcome]]
) -> DeployOutcome:
    """Run one lifecycle change on this gateway's deployer and answer its outcome.

    An unreachable catalog database becomes a 503; after a change this gateway reloads its
    catalog at once, so its next request already routes to the new deployment.
    """
    try:
        outcome = await change(runtime(request).deployer)
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise CatalogUnavailable(
            f"the model catalog database is unavailable: {type(exc).__name__}: {str(exc).strip()}"
        ) from exc
    if outcome.action != "unchanged":
        await reload_catalog(runtime(request), "a lifecycle change")
    return DeployOutcome(**outcome.as_dict())


def _event(entry: HistoryEntry) -> LifecycleEvent:
    return LifecycleEvent(
        id=entry.id,
        deployment_id=entry.deployment_id,
        model_name=entry.model_name,
        action=entry.action,
        detail=entry.detail,
        at=entry.at,
    )
