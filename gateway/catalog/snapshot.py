"""The model catalog: active ``model_deployments`` rows as an immutable in-memory snapshot.

Two background tasks keep the snapshot fresh:

* the *listener* holds its own connection with ``LISTEN model_catalog`` and flags a reload on
  every notification and after every (re)connect, since notifications sent while it was
  disconnected are lost; it reconnects with exponential backoff;
* the *refresher* reloads the whole catalog (one query through the pool) when flagged, and at
  least every ``catalog_refresh_s``. Notifications arriving during a reload flag the next one,
  so bursts cost at most two reloads.

When Postgres is unreachable the last snapshot keeps serving; ``loaded`` stays false only
until the first successful load.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from gateway.catalog.records import DEPLOYMENT_COLUMNS, Deployment
from gateway.catalog.traffic import RoutingTable
from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

CHANNEL = "model_catalog"

SELECT_ACTIVE = f"""
    SELECT {DEPLOYMENT_COLUMNS}
    FROM model_deployments
    WHERE is_active
    ORDER BY model_name, deployment_id
"""

#: TCP keepalives on the listening connection, so a silently dead peer is noticed
_LISTENER_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


@dataclass(frozen=True)
class ModelEntry:
    """A model's active deployments (shadows included) and its traffic split."""

    name: str
    deployments: tuple[Deployment, ...]
    routing: RoutingTable
    #: the active shadow deployments, which receive mirrored requests and never answer
    shadows: tuple[Deployment, ...] = ()

    @classmethod
    def build(cls, name: str, deployments: Sequence[Deployment]) -> ModelEntry:
        deps = tuple(deployments)
        shadows = tuple(d for d in deps if d.is_shadow)
        return cls(name, deps, RoutingTable.build(deps), shadows)


@dataclass(frozen=True)
class CatalogSnapshot:
    models: Mapping[str, ModelEntry] = field(default_factory=lambda: MappingProxyType({}))
    #: unix time of the load; ``None`` before the first one
    loaded_at: float | None = None

    @classmethod
    def build(cls, deployments: Sequence[Deployment], loaded_at: float) -> CatalogSnapshot:
        by_model: dict[str, list[Deployment]] = {}
        for dep in deployments:
            by_model.setdefault(dep.model_name, []).append(dep)
        models = {name: ModelEntry.build(name, deps) for name, deps in sorted(by_model.items())}
        return cls(MappingProxyType(models), loaded_at)

    def get(self, model_name: str) -> ModelEntry | None:
        return self.models.get(model_name)

    def deployments(self) -> tuple[Deployment, ...]:
        return tuple(d for entry in self.models.values() for d in entry.deployments)


class _Backoff:
    """Exponential backoff with jitter: first, 2x, 4x, ... capped."""

    def __init__(self, first_s: float = 0.1, cap_s: float = 5.0) -> None:
        self._first, self._cap = first_s, cap_s
        self._next = first_s

    def reset(self) -> None:
        self._next = self._first

    def delay(self) -> float:
        delay = self._next
        self._next = min(self._cap, delay * 2)
        return delay * random.uniform(0.5, 1.0)


class Catalog:
    """Active deployments, kept current through LISTEN/NOTIFY plus a periodic reload."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        refresh_s: float,
        connect_timeout_s: float,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._pool = pool
        self._refresh_s = refresh_s
        self._connect_timeout_s = connect_timeout_s
        self._metrics = metrics
        self._snapshot = CatalogSnapshot()
        self._changed = asyncio.Event()
        self._loaded = asyncio.Event()
        #: one reload at a time, so a snapshot read earlier never replaces one read later
        self._reload_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.last_error: str | None = None

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    def snapshot(self) -> CatalogSnapshot:
        return self._snapshot

    def get(self, model_name: str) -> ModelEntry | None:
        return self._snapshot.get(model_name)

    async def start(self, wait_s: float) -> None:
        """Start the background tasks; wait up to ``wait_s`` for the first load."""
        self._changed.set()
        self._tasks = [
            asyncio.create_task(self._listen(), name="catalog-listener"),
            asyncio.create_task(self._refresh(), name="catalog-refresher"),
        ]
        if wait_s > 0 and not await _wait(self._loaded, wait_s):
            log.warning(
                "model catalog not loaded after %.1fs (%s); retrying in the background",
                wait_s,
                self.last_error,
            )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def reload(self) -> CatalogSnapshot:
        """Read every active deployment and swap in the new snapshot.

        Callers that just changed the catalog (the shadow admin routes) await this to see their
        change at once; reloads are serialized, so the returned snapshot includes every change
        committed before the call.
        """
        async with self._reload_lock:
            async with self._pool.connection(timeout=self._connect_timeout_s) as conn:
                cur = await conn.execute(SELECT_ACTIVE)
                rows = await cur.fetchall()
            snapshot = CatalogSnapshot.build([Deployment.from_row(r) for r in rows], time.time())
            return self._swap(snapshot, len(rows))

    def _swap(self, snapshot: CatalogSnapshot, rows: int) -> CatalogSnapshot:
        changed = snapshot.deployments() != self._snapshot.deployments()
        self._snapshot = snapshot
        self._loaded.set()
        self.last_error = None
        if changed:
            log.info(
                "model catalog loaded: %d active deployments of %d models",
                rows,
                len(snapshot.models),
            )
        return snapshot

    async def _refresh(self) -> None:
        backoff = _Backoff()
        while True:
            await _wait(self._changed, self._refresh_s)  # on timeout: the periodic reload
            self._changed.clear()
            try:
                await self.reload()
            except Exception as exc:
                self._failed("reload", exc)
                await asyncio.sleep(backoff.delay())
                self._changed.set()
            else:
                backoff.reset()
                self._count_reload("ok")

    async def _listen(self) -> None:
        backoff = _Backoff()
        conninfo = self._pool.conninfo
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    conninfo,
                    autocommit=True,
                    connect_timeout=max(1, round(self._connect_timeout_s)),
                    **_LISTENER_KEEPALIVES,
                )
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._set_listening(True)
                    backoff.reset()
                    self._changed.set()  # catch up on whatever was missed while away
                    async for notify in conn.notifies():
                        log.debug("catalog change: %s", _payload(notify.payload))
                        self._changed.set()
            except Exception as exc:
                self._failed("listen", exc)
            finally:
                self._set_listening(False)
            await asyncio.sleep(backoff.delay())

    def _failed(self, what: str, exc: Exception) -> None:
        self.last_error = f"{what}: {type(exc).__name__}: {str(exc).strip()}"
        log.warning("model catalog %s failed: %s", what, self.last_error)
        if what == "reload":
            self._count_reload("error")

    def _count_reload(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.catalog_reloads.labels(result).inc()

    def _set_listening(self, up: bool) -> None:
        if self._metrics is not None:
            self._metrics.catalog_listening.set(1 if up else 0)


async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
    """Whether ``event`` is set within ``timeout_s``.

    Not ``asyncio.wait_for``: before Python 3.12 it swallows a cancellation that arrives
    while the event is being set, and ``close()`` would then wait forever.
    """
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()
    return event.is_set()


def _payload(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw
