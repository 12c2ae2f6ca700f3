"""Keep each deployment's class-prior fallback equal to its version's training statistics.

A deployment the swap procedure creates gets its ``fallback_config`` from the version it
serves (``gateway.repository.render.class_prior_fallback``). Rows created otherwise - the demo
catalog's
seed migration, a catalog edited by hand, or rows written before fallbacks were derived - may
carry a stale prior. :func:`align_fallbacks` (run by the deployer service at start) rewrites
those, one transaction and one ``fallback_updated`` history row each, and leaves rows whose
endpoint is not a rendered pipeline alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

from gateway.catalog import swaps
from gateway.repository.configs import class_prior_fallback
from gateway.repository.layout import RenderError
from gateway.settings import Settings

log = logging.getLogger(__name__)

#: fallback_config keys that decide what is served
SERVED_KEYS = ("type", "score", "threshold")


async def align_fallbacks(pool: AsyncConnectionPool, repository: Path, settings: Settings) -> int:
    """Update every active deployment whose fallback differs from its training statistics;
    return how many were updated."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT DISTINCT model_name FROM model_deployments WHERE is_active ORDER BY 1"
        )
        models = [str(r[0]) for r in await cur.fetchall()]
        updated = 0
        for model in models:
            for row in await swaps.active_rows(conn, model):
                try:
                    wanted = class_prior_fallback(repository, row.endpoint, settings)
                except (RenderError, OSError, ValueError) as exc:
                    log.warning("%s: no training statistics for %s: %s", model, row.endpoint, exc)
                    continue
                if wanted is None or _same(row.fallback_config, wanted):
                    continue
                await swaps.set_fallback(conn, row, model, wanted)
                updated += 1
                log.info(
                    "%s version %s: fallback class prior %s -> %s",
                    model,
                    row.version,
                    row.fallback_config.get("score"),
                    wanted["score"],
                )
    return updated


def _same(current: dict[str, object], wanted: dict[str, object]) -> bool:
    return all(current.get(k) == wanted.get(k) for k in SERVED_KEYS)
