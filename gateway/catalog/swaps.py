"""The catalog side of a swap: ``model_deployments`` changes in one transaction, plus history.

Every function takes a connection the caller holds (autocommit, with the model's lifecycle
lock); the ones that change rows run inside ``async with conn.transaction()`` so the gateways,
notified at commit, see either the old routing or the new one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

#: history actions of a successful change, whose detail has "version" and "previous_version"
CHAMPION_ACTIONS = ("promoted", "rolled_back")


@dataclass(frozen=True)
class Row:
    """An active ``model_deployments`` row, as the lifecycle needs it."""

    deployment_id: int
    version: str
    endpoint: str
    traffic_pct: float
    is_shadow: bool
    feature_groups: list[Any]
    fallback_config: dict[str, Any]
    shadow_sample_pct: float


@dataclass(frozen=True)
class HistoryEntry:
    id: int
    deployment_id: int | None
    model_name: str
    action: str
    detail: dict[str, Any]
    at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "deployment_id": self.deployment_id,
            "model_name": self.model_name,
            "action": self.action,
            "detail": self.detail,
            "at": self.at.isoformat(),
        }


async def active_rows(conn: AsyncConnection, model: str) -> list[Row]:
    cur = await conn.execute(
        """
        SELECT deployment_id, model_version, serving_endpoint, traffic_pct, is_shadow,
               feature_groups, fallback_config, shadow_sample_pct
        FROM model_deployments
        WHERE model_name = %s AND is_active
        ORDER BY deployment_id
        """,
        (model,),
    )
    return [
        Row(int(r[0]), r[1], r[2], float(r[3]), bool(r[4]), list(r[5]), dict(r[6]), float(r[7]))
        for r in await cur.fetchall()
    ]


def arms(rows: Sequence[Row]) -> list[Row]:
    """Rows that answer requests (non-shadow, traffic_pct > 0), oldest first."""
    return [r for r in rows if not r.is_shadow and r.traffic_pct > 0]


def prod(rows: Sequence[Row]) -> Row | None:
    """The arm with the largest share, the oldest on a tie (as the gateway's router picks)."""
    candidates = arms(rows)
    return min(candidates, key=lambda r: (-r.traffic_pct, r.deployment_id)) if candidates else None


async def record(
    conn: AsyncConnection,
    model: str,
    action: str,
    detail: Mapping[str, Any],
    deployment_id: int | None = None,
) -> None:
    await conn.execute(
        """
        INSERT INTO model_deployment_history (deployment_id, model_name, action, detail)
        VALUES (%s, %s, %s, %s)
        """,
        (deployment_id, model, action, Jsonb(dict(detail))),
    )


async def _insert(
    conn: AsyncConnection,
    model: str,
    version: int,
    endpoint: str,
    template: Row | None,
    *,
    traffic_pct: float,
    fallback: Mapping[str, Any] | None,
    is_shadow: bool = False,
    sample_pct: float = 100.0,
) -> int:
    """A new active row; ``fallback`` (else the template's) becomes its ``fallback_config``."""
    groups = template.feature_groups if template is not None else []
    if fallback is None:
        fallback = template.fallback_config if template is not None else {}
    cur = await conn.execute(
        """
        INSERT INTO model_deployments
            (model_name, model_version, serving_endpoint, traffic_pct, feature_groups,
             fallback_config, is_shadow, shadow_sample_pct)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        RETURNING deployment_id
        """,
        (
            model,
            str(version),
            endpoint,
            traffic_pct,
            Jsonb(groups),
            Jsonb(dict(fallback)),
            is_shadow,
            sample_pct,
        ),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _retire(conn: AsyncConnection, ids: Sequence[int]) -> None:
    if ids:
        await conn.execute(
            "UPDATE model_deployments SET is_active = false WHERE deployment_id = ANY(%s)",
            (list(ids),),
        )


async def _set_traffic(conn: AsyncConnection, deployment_id: int, pct: float) -> None:
    await conn.execute(
        "UPDATE model_deployments SET traffic_pct = %s WHERE deployment_id = %s",
        (pct, deployment_id),
    )


async def switch_to(
    conn: AsyncConnection,
    model: str,
    version: int,
    endpoint: str,
    action: str,
    detail: Mapping[str, Any],
    fallback: Mapping[str, Any] | None = None,
) -> int:
    """``version`` takes all traffic: reuse its active arm or insert one; retire the others.

    Returns the deployment id now serving 100%.
    """
    async with conn.transaction():
        rows = await active_rows(conn, model)
        mine = next(
            (r for r in arms(rows) if r.version == str(version) and r.endpoint == endpoint), None
        )
        others = [r.deployment_id for r in rows if not r.is_shadow and r is not mine]
        # a shadow of the promoted version has nothing left to compare against
        others += [r.deployment_id for r in rows if r.is_shadow and r.version == str(version)]
        await _retire(conn, others)
        if mine is not None:
            await _set_traffic(conn, mine.deployment_id, 100.0)
            dep_id = mine.deployment_id
        else:
            template = prod(rows) or (rows[0] if rows else None)
            dep_id = await _insert(
                conn, model, version, endpoint, template, traffic_pct=100.0, fallback=fallback
            )
        await record(conn, model, action, detail, dep_id)
    return dep_id


async def start_canary(
    conn: AsyncConnection,
    model: str,
    version: int,
    endpoint: str,
    traffic_pct: float,
    detail: Mapping[str, Any],
    fallback: Mapping[str, Any] | None = None,
) -> int:
    """``version`` gets ``traffic_pct``, the prod arm the rest; other canaries are retired."""
    async with conn.transaction():
        rows = await active_rows(conn, model)
        main = prod([r for r in rows if r.version != str(version)])
        if main is None:
            raise ValueError(f"{model} has no production deployment to split traffic with")
        mine = next((r for r in arms(rows) if r.version == str(version)), None)
        others = [
            r.deployment_id
            for r in rows
            if not r.is_shadow and r is not mine and r.deployment_id != main.deployment_id
        ]
        await _retire(conn, others)
        await _set_traffic(conn, main.deployment_id, 100.0 - traffic_pct)
        if mine is not None:
            await _set_traffic(conn, mine.deployment_id, traffic_pct)
            dep_id = mine.deployment_id
        else:
            dep_id = await _insert(
                conn, model, version, endpoint, main, traffic_pct=traffic_pct, fallback=fallback
            )
        await record(conn, model, "canary", detail, dep_id)
    return dep_id


async def start_shadow(
    conn: AsyncConnection,
    model: str,
    version: int,
    endpoint: str,
    sample_pct: float,
    detail: Mapping[str, Any],
    fallback: Mapping[str, Any] | None = None,
) -> int:
    async with conn.transaction():
        rows = await active_rows(conn, model)
        dep_id = await _insert(
            conn,
            model,
            version,
            endpoint,
            prod(rows),
            traffic_pct=0.0,
            fallback=fallback,
            is_shadow=True,
            sample_pct=sample_pct,
        )
        await record(conn, model, "shadow", detail, dep_id)
    return dep_id


async def set_fallback(
    conn: AsyncConnection, row: Row, model: str, fallback: Mapping[str, Any]
) -> None:
    """Replace ``row``'s ``fallback_config`` (and record the change)."""
    async with conn.transaction():
        await conn.execute(
            "UPDATE model_deployments SET fallback_config = %s WHERE deployment_id = %s",
            (Jsonb(dict(fallback)), row.deployment_id),
        )
        await record(
            conn,
            model,
            "fallback_updated",
            {"version": row.version, "previous": row.fallback_config, "fallback": dict(fallback)},
            row.deployment_id,
        )


async def end_trials(conn: AsyncConnection, model: str, detail: Mapping[str, Any]) -> list[Row]:
    """Retire canary arms and shadows; the prod arm goes back to 100%. Returns the retired."""
    async with conn.transaction():
        rows = await active_rows(conn, model)
        main = prod(rows)
        retired = [r for r in rows if main is None or r.deployment_id != main.deployment_id]
        await _retire(conn, [r.deployment_id for r in retired])
        if main is not None:
            await _set_traffic(conn, main.deployment_id, 100.0)
        await record(
            conn,
            model,
            "rolled_back",
            {**detail, "retired": [r.version for r in retired]},
            main.deployment_id if main else None,
        )
    return retired


async def history(conn: AsyncConnection, model: str, limit: int) -> list[HistoryEntry]:
    cur = await conn.execute(
        """
        SELECT id, deployment_id, model_name, action, detail, at
        FROM model_deployment_history
        WHERE model_name = %s
        ORDER BY id DESC
        LIMIT %s
        """,
        (model, limit),
    )
    return [
        HistoryEntry(
            int(r[0]),
            int(r[1]) if r[1] is not None else None,
            r[2],
            r[3],
            dict(r[4]),
            r[5],
        )
        for r in await cur.fetchall()
    ]


async def attempted(conn: AsyncConnection, model: str, version: int) -> bool:
    cur = await conn.execute(
        """
        SELECT 1 FROM model_deployment_history
        WHERE model_name = %s AND action = 'deploy_started' AND detail->>'version' = %s
        LIMIT 1
        """,
        (model, str(version)),
    )
    return await cur.fetchone() is not None


async def previous_champion(conn: AsyncConnection, model: str, current: str) -> str | None:
    """The version that served before ``current`` took over (from the last champion change)."""
    cur = await conn.execute(
        """
        SELECT detail->>'previous_version' FROM model_deployment_history
        WHERE model_name = %s AND action = ANY(%s) AND detail->>'version' = %s
              AND detail ? 'previous_version'
        ORDER BY id DESC
        LIMIT 1
        """,
        (model, list(CHAMPION_ACTIONS), current),
    )
    row = await cur.fetchone()
    return row[0] if row is not None else None
