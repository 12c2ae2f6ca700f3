"""Registering and removing shadow deployments: writes to the catalog, checked against Triton.

``register_shadow`` inserts an active ``model_deployments`` row with ``is_shadow = true`` and
``traffic_pct = 0`` plus a ``model_deployment_history`` row (``shadow_registered``);
``remove_shadows`` deactivates a model's shadows (``is_active = false``, history
``shadow_removed``). The row's trigger notifies every gateway (``NOTIFY model_catalog``); the
caller also reloads its own catalog so its answer and the next request already see the change.

Refused: a model without an active production (non-shadow) deployment (404
``model_not_found``), a second active shadow of the same version (409 ``shadow_exists``:
remove it first, so a replacement is always explicit), a ``serving_endpoint`` that is not READY
in Triton (422 ``invalid_request`` naming the field). Nothing to remove is 404
``shadow_not_found``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway.catalog.records import DEPLOYMENT_COLUMNS, Deployment
from gateway.errors import (
    Conflict,
    GatewayError,
    ModelNotFound,
    NotFound,
)
from gateway.schemas import ShadowRequest

log = logging.getLogger(__name__)

REGISTERED = "shadow_registered"
REMOVED = "shadow_removed"


class ShadowExists(Conflict):
    code = "shadow_exists"


class ShadowNotFound(NotFound):
    code = "shadow_not_found"


class CatalogUnavailable(GatewayError):
    status, code = 503, "catalog_unavailable"


@asynccontextmanager
async def _catalog_connection(
    pool: AsyncConnectionPool, transaction: bool = True
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pooled connection (in a transaction); Postgres failures become a 503."""
    try:
        async with pool.connection() as conn:
            if transaction:
                async with conn.transaction():
                    yield conn
            else:
                yield conn
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise CatalogUnavailable(
            f"the model catalog database is unavailable: {type(exc).__name__}: {str(exc).strip()}"
        ) from exc


_PRODUCTION = """
    SELECT feature_groups FROM model_deployments
    WHERE model_name = %s AND is_active AND NOT is_shadow
    ORDER BY traffic_pct DESC, deployment_id
    LIMIT 1
    FOR SHARE
"""
_ACTIVE_SHADOW = """
    SELECT deployment_id FROM model_deployments
    WHERE model_name = %s AND model_version = %s AND is_active AND is_shadow
"""
_INSERT = f"""
    INSERT INTO model_deployments
        (model_name, model_version, serving_endpoint, traffic_pct, feature_groups,
         fallback_config, is_shadow, shadow_sample_pct)
    VALUES (%s, %s, %s, 0, %s, %s, true, %s)
    RETURNING {DEPLOYMENT_COLUMNS}
"""
_DEACTIVATE = f"""
    UPDATE model_deployments SET is_active = false
    WHERE model_name = %s AND is_active AND is_shadow AND (%s::text IS NULL OR model_version = %s)
    RETURNING {DEPLOYMENT_COLUMNS}
"""
_HISTORY = """
    INSERT INTO model_deployment_history (deployment_id, model_name, action, detail)
    VALUES (%s, %s, %s, %s)
"""
_HAS_ACTIVE = "SELECT 1 FROM model_deployments WHERE model_name = %s AND is_active LIMIT 1"


async def check_can_register(pool: AsyncConnectionPool, model_name: str, version: str) -> None:
    """404 / 409 before anything else is asked (the insert checks again, under lock)."""
    async with _catalog_connection(pool, transaction=False) as conn:
        await _check(conn, model_name, version)


async def register_shadow(
    pool: AsyncConnectionPool, model_name: str, body: ShadowRequest, actor: str | None
) -> Deployment:
    """Insert the shadow row and its history row in one transaction; the new deployment."""
    async with _catalog_connection(pool) as conn:
        production_groups = await _check(conn, model_name, body.model_version)
        groups = body.feature_groups if body.feature_groups is not None else production_groups
        fallback = body.fallback_config.model_dump() if body.fallback_config is not None else {}
        params = (
            model_name,
            body.model_version,
            body.serving_endpoint,
            Jsonb(list(groups)),
            Jsonb(fallback),
            body.sample_pct,
        )
        try:
            cur = await conn.execute(_INSERT, params)
        except psycopg.errors.UniqueViolation:  # registered concurrently
            raise _exists(model_name, body.model_version) from None
        row = await cur.fetchone()
        assert row is not None
        shadow = Deployment.from_row(row)
        detail = {
            "model_version": shadow.model_version,
            "serving_endpoint": shadow.serving_endpoint,
            "shadow_sample_pct": shadow.shadow_sample_pct,
            "actor": actor,
        }
        await conn.execute(_HISTORY, (shadow.deployment_id, model_name, REGISTERED, Jsonb(detail)))
    log.info(
        "shadow registered",
        extra={"fields": {"model": model_name, **detail, "deployment_id": shadow.deployment_id}},
    )
    return shadow


async def remove_shadows(
    pool: AsyncConnectionPool, model_name: str, version: str | None, actor: str | None
) -> list[Deployment]:
    """Deactivate the model's active shadows (of ``version`` only, if given)."""
    async with _catalog_connection(pool) as conn:
        cur = await conn.execute(_DEACTIVATE, (model_name, version, version))
        removed = [Deployment.from_row(row) for row in await cur.fetchall()]
        if not removed:
            cur = await conn.execute(_HAS_ACTIVE, (model_name,))
            if await cur.fetchone() is None:
                raise ModelNotFound(f"unknown model {model_name!r}")
            which = f" of version {version!r}" if version is not None else ""
            raise ShadowNotFound(f"model {model_name!r} has no active shadow deployment{which}")
        for shadow in removed:
            detail = {"model_version": shadow.model_version, "actor": actor}
            await conn.execute(_HISTORY, (shadow.deployment_id, model_name, REMOVED, Jsonb(detail)))
    log.info(
        "shadows removed",
        extra={
            "fields": {
                "model": model_name,
                "deployment_ids": [d.deployment_id for d in removed],
                "actor": actor,
            }
        },
    )
    return removed


async def _check(
    conn: psycopg.AsyncConnection[Any], model_name: str, version: str
) -> Sequence[str]:
    """The production arm's feature groups; 404 without one, 409 if the shadow exists."""
    cur = await conn.execute(_PRODUCTION, (model_name,))
    row = await cur.fetchone()
    if row is None:
        raise ModelNotFound(
            f"unknown model {model_name!r}: no active production deployment to shadow"
        )
    cur = await conn.execute(_ACTIVE_SHADOW, (model_name, version))
    if await cur.fetchone() is not None:
        raise _exists(model_name, version)
    return [str(g) for g in row[0]]


def _exists(model_name: str, version: str) -> ShadowExists:
    return ShadowExists(
        f"model {model_name!r} already has an active shadow of version {version!r}; "
        f"remove it first (DELETE /models/{model_name}/shadow?model_version={version})"
    )
