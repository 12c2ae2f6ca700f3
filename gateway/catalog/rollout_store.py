"""What the MLflow rollout received and applied, in the catalog database (migration 0003).

* ``mlflow_webhook_deliveries``: one row per delivery id; a second delivery with the same id
  is a duplicate.
* ``registry_applied``: one row per registry state acted on (or deliberately not). A claim is
  atomic across processes: the unique index on ``(model, version) WHERE kind = 'created'``
  for a new version, a transaction-scoped advisory lock per ``(model, alias)`` for an alias,
  whose state is its newest row. So the webhook and the reconcile loop never both deploy
  the same state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

CREATED = "created"
ALIAS_PREFIX = "alias:"
PENDING = "pending"


def alias_kind(alias: str) -> str:
    return f"{ALIAS_PREFIX}{alias}"


@dataclass(frozen=True)
class AppliedState:
    """What ``registry_applied`` records for some models."""

    #: model -> versions whose creation was handled (any outcome)
    created: Mapping[str, frozenset[int]] = field(default_factory=dict)
    #: (model, alias) -> the version of its newest row (None: recorded as deleted)
    aliases: Mapping[tuple[str, str], int | None] = field(default_factory=dict)


class Delivery(Protocol):
    """What is recorded of one webhook delivery (``gateway.lifecycle.mlflow_hooks``)."""

    @property
    def delivery_id(self) -> str: ...
    @property
    def event(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def version(self) -> int | None: ...
    @property
    def alias(self) -> str | None: ...


class SyncStore:
    """Deliveries and applied registry states, over the catalog's connection pool."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def ping(self) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("SELECT 1")

    async def record_delivery(self, event: Delivery) -> bool:
        """Record a delivery; False if its delivery id was recorded before."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """
                INSERT INTO mlflow_webhook_deliveries
                    (delivery_id, event, model_name, model_version, alias)
                VALUES (%s, %s, %s, %s, %s)
                ON CONFLICT (delivery_id) DO NOTHING
                RETURNING delivery_id
                """,
                (event.delivery_id, event.event, event.model, event.version, event.alias),
            )
            return await cur.fetchone() is not None

    async def applied_state(self, models: Sequence[str]) -> AppliedState:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT model_name, model_version FROM registry_applied
                WHERE kind = 'created' AND model_name = ANY(%s)
                """,
                (list(models),),
            )
            created: dict[str, set[int]] = {}
            for model, version in await cur.fetchall():
                created.setdefault(model, set()).add(version)
            cur = await conn.execute(
                """
                SELECT DISTINCT ON (model_name, kind) model_name, kind, model_version
                FROM registry_applied
                WHERE kind LIKE 'alias:%%' AND model_name = ANY(%s)
                ORDER BY model_name, kind, id DESC
                """,
                (list(models),),
            )
            aliases = {
                (model, kind.removeprefix(ALIAS_PREFIX)): version
                for model, kind, version in await cur.fetchall()
            }
        return AppliedState({m: frozenset(v) for m, v in created.items()}, aliases)

    async def newest_created(self, model: str) -> int | None:
        """The highest version whose creation was handled."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT max(model_version) FROM registry_applied "
                "WHERE kind = 'created' AND model_name = %s",
                (model,),
            )
            row = await cur.fetchone()
        return row[0] if row else None

    async def claim(
        self,
        model: str,
        kind: str,
        version: int | None,
        *,
        trigger: str,
        outcome: str = PENDING,
        detail: Mapping[str, Any] | None = None,
    ) -> int | None:
        """Record that this state is being handled; its row id, or None if it was before.

        A version's creation is claimed once ever; an alias state is claimed when the alias's
        newest row holds another version (so an alias moving back to a version acts again).
        """
        values = (model, kind, version, outcome, trigger, Jsonb(dict(detail or {})))
        async with self._pool.connection() as conn:
            if kind == CREATED:
                cur = await conn.execute(
                    """
                    INSERT INTO registry_applied
                        (model_name, kind, model_version, outcome, trigger, detail)
                    VALUES (%s, %s, %s, %s, %s, %s)
                    ON CONFLICT (model_name, model_version) WHERE kind = 'created' DO NOTHING
                    RETURNING id
                    """,
                    values,
                )
                row = await cur.fetchone()
                return row[0] if row else None
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                    (f"registry_applied:{model}:{kind}",),
                )
                cur = await conn.execute(
                    """
                    SELECT model_version FROM registry_applied
                    WHERE model_name = %s AND kind = %s ORDER BY id DESC LIMIT 1
                    """,
                    (model, kind),
                )
                newest = await cur.fetchone()
                # unchanged alias, or a deletion of an alias never recorded
                if (newest[0] if newest else None) == version:
                    return None
                cur = await conn.execute(
                    """
                    INSERT INTO registry_applied
                        (model_name, kind, model_version, outcome, trigger, detail)
                    VALUES (%s, %s, %s, %s, %s, %s)
                    RETURNING id
                    """,
                    values,
                )
                row = await cur.fetchone()
                return row[0] if row else None

    async def finish(self, claim_id: int, outcome: str, detail: Mapping[str, Any]) -> None:
        """Set the outcome of a claimed state; ``detail`` is merged into the claim's."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE registry_applied SET outcome = %s, detail = detail || %s, "
                "applied_at = now() WHERE id = %s",
                (outcome, Jsonb(dict(detail)), claim_id),
            )
