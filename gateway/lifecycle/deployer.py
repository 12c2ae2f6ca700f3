"""The one swap procedure every trigger runs (admin API, CLI, MLflow webhook and reconcile,
dropped version directories).

For version N of scoring model M (served by pipeline ``M_pipeline``):

1. **materialize** - validate the candidate and place it as ``model_repository/M/N/``
   atomically (or validate a directory already there);
2. **load** - reload M serving ``[old..., N]`` and load the pipeline pinned to N
   (``M_postprocess__vN`` with N's threshold, ``M_pipeline__vN``);
3. **smoke** - golden examples through M version N, a few rows through ``M_pipeline__vN``;
4. **catalog** - one transaction: N's deployment row takes the traffic (all of it, a canary
   share, or none as a shadow); the gateways switch on NOTIFY;
5. **drain** - in the background, ``drain_s`` later, versions no deployment routes to are
   unloaded and the unversioned pipelines follow the new champion.

A failure in steps 1-4 undoes what was loaded, leaves the catalog and ``serving.json`` as they
were, and records a ``deploy_failed`` history row, a log line and a metric. One Postgres
advisory lock per model serialises every change across processes; it is held until the drain
is over, so the next change of that model starts from a settled state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from gateway.catalog import swaps
from gateway.catalog.dsn import catalog_pool
from gateway.catalog.swaps import HistoryEntry, Row
from gateway.lifecycle.errors import ArtifactInvalid, NothingToDo, UnknownModel
from gateway.lifecycle.materialize import version_dir
from gateway.lifecycle.metrics import LifecycleMetrics
from gateway.lifecycle.retire import retire
from gateway.lifecycle.swap import DeployRequest, Mode, Outcome, SwapAttempt, SwapSite
from gateway.lifecycle.triton_repo import TritonRepository
from gateway.settings import Settings

__all__ = ["DeployRequest", "Deployer", "HistoryEntry", "Mode", "Outcome"]

log = logging.getLogger(__name__)

#: first key of the per-model advisory lock (the second is hashtext(model))
LOCK_CLASS = 0x5254


class Deployer:
    """Runs swaps, promotions, canaries and rollbacks of the managed models."""

    def __init__(
        self,
        settings: Settings,
        *,
        pool: AsyncConnectionPool,
        triton: TritonRepository,
        metrics: LifecycleMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.lc = settings.lifecycle
        self.managed_models = tuple(self.lc.managed_models)
        self.repository = settings.triton.model_repository.resolve()
        self.target = settings.triton.target
        self._pool = pool
        self._triton = triton
        self.metrics = metrics if metrics is not None else LifecycleMetrics()
        self._background: set[asyncio.Task[None]] = set()
        self._site = SwapSite(settings, self.repository, self.target, triton, pool, self.metrics)

    @property
    def pool(self) -> AsyncConnectionPool:
        """The catalog pool the deployer uses (for stores that share its database)."""
        return self._pool

    # ------------------------------------------------------------------ public actions

    async def deploy(self, req: DeployRequest) -> Outcome:
        """Swap ``req.version`` in (promote), beside the champion (canary) or as a shadow."""
        self._check_model(req.model)
        if req.version < 1:
            raise ArtifactInvalid(f"{req.model}: version must be >= 1, got {req.version}")
        pct = self._pct(req)
        conn = await self._lock(req.model)
        handed_off = False
        try:
            rows = await swaps.active_rows(conn, req.model)
            if _serves_as(rows, req.version, req.mode, pct):
                return Outcome(req.model, req.version, "unchanged", None, None, None)
            main = swaps.prod(rows)
            if req.mode != "promote" and main is not None and main.version == str(req.version):
                raise NothingToDo(
                    f"{req.model} version {req.version} already serves production traffic; "
                    f"a {req.mode} needs another version"
                )
            outcome = await SwapAttempt(self._site, conn, req, rows, pct).run()
            self._drain_later(req.model, conn)
            handed_off = True
            return outcome
        finally:
            if not handed_off:
                await self._unlock(req.model, conn)

    async def promote(
        self, model: str, version: int | None = None, *, trigger: str, actor: str | None = None
    ) -> Outcome:
        """``version`` (default: the active canary) takes all traffic."""
        self._check_model(model)
        if version is None:
            async with self._pool.connection() as conn:
                rows = await swaps.active_rows(conn, model)
            main = swaps.prod(rows)
            trials = [r for r in swaps.arms(rows) if main is None or r is not main]
            if not trials:
                raise NothingToDo(f"{model} has no canary to promote; name a version")
            version = int(max(trials, key=lambda r: r.deployment_id).version)
        return await self.deploy(
            DeployRequest(model, version, "promote", trigger=trigger, actor=actor)
        )

    async def canary(
        self,
        model: str,
        version: int,
        traffic_pct: float,
        *,
        trigger: str,
        actor: str | None = None,
    ) -> Outcome:
        return await self.deploy(
            DeployRequest(
                model, version, "canary", traffic_pct=traffic_pct, trigger=trigger, actor=actor
            )
        )

    async def rollback(self, model: str, *, trigger: str, actor: str | None = None) -> Outcome:
        """End an active canary or shadow; without one, return to the previous champion."""
        self._check_model(model)
        conn = await self._lock(model)
        target: int | None = None
        current: Row | None = None
        try:
            rows = await swaps.active_rows(conn, model)
            current = swaps.prod(rows)
            if current is not None and len(rows) > 1:
                retired = await swaps.end_trials(
                    conn, model, {"trigger": trigger, "actor": actor, "version": current.version}
                )
                self.metrics.changes.labels(model, "rolled_back").inc()
                log.info("%s: ended %s, %s serves alone", model, retired, current.version)
                self._drain_later(model, conn)
                conn = None
                return Outcome(
                    model,
                    int(current.version),
                    "rolled_back",
                    current.deployment_id,
                    ",".join(r.version for r in retired),
                    time.time() + self.lc.drain_s,
                )
            if current is None:
                raise NothingToDo(f"{model} has no deployment serving traffic")
            previous = await swaps.previous_champion(conn, model, current.version)
            if previous is None:
                raise NothingToDo(
                    f"{model} version {current.version} has no earlier version to roll back to"
                )
            target = int(previous)
        finally:
            if conn is not None:
                await self._unlock(model, conn)
        if not version_dir(self.repository, model, target).is_dir():
            raise NothingToDo(f"{model} version {target} is no longer in the model repository")
        outcome = await self.deploy(
            DeployRequest(
                model,
                target,
                "promote",
                trigger=trigger,
                actor=actor,
                detail={"rollback_from": current.version},
            )
        )
        return Outcome(
            outcome.model,
            outcome.version,
            "rolled_back",
            outcome.deployment_id,
            current.version,
            outcome.drain_until,
            outcome.timings_ms,
        )

    async def history(self, model: str, limit: int = 20) -> list[HistoryEntry]:
        async with self._pool.connection() as conn:
            return await swaps.history(conn, model, limit)

    async def attempted(self, model: str, version: int) -> bool:
        async with self._pool.connection() as conn:
            return await swaps.attempted(conn, model, version)

    async def wait_settled(self, timeout_s: float | None = None) -> None:
        """Wait for the drains and unloads this deployer started."""
        tasks = set(self._background)
        if tasks:
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout_s)

    async def close(self) -> None:
        """Cancel pending drains: their locks are released; versions stay loaded until the
        next change of the model retires them."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # ------------------------------------------------------------------ drain and retire

    def _drain_later(self, model: str, conn: AsyncConnection) -> None:
        task = asyncio.create_task(self._drain(model, conn), name=f"drain-{model}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain(self, model: str, conn: AsyncConnection) -> None:
        try:
            await asyncio.sleep(self.lc.drain_s)
            started = time.perf_counter()
            await retire(self._site, model, conn)
            self._site.timed("retire", started)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: retiring replaced versions failed; the next change retries", model)
        finally:
            await self._unlock(model, conn)

    # ------------------------------------------------------------------ helpers

    def _check_model(self, model: str) -> None:
        if model not in self.managed_models:
            raise UnknownModel(
                f"model {model!r} is not managed by the lifecycle; managed: "
                f"{list(self.managed_models)}"
            )

    def _pct(self, req: DeployRequest) -> float:
        if req.mode == "promote":
            return 100.0
        default = self.lc.canary_pct if req.mode == "canary" else 100.0
        pct = req.traffic_pct if req.traffic_pct is not None else default
        upper_ok = pct < 100 if req.mode == "canary" else pct <= 100
        if not (pct > 0 and upper_ok):
            bound = "0 < traffic_pct < 100" if req.mode == "canary" else "0 < sample_pct <= 100"
            raise ArtifactInvalid(f"{req.model}: {req.mode} needs {bound}, got {pct:g}")
        return float(pct)

    async def _lock(self, model: str) -> AsyncConnection:
        conn = await self._pool.getconn()
        try:
            await conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, model))
        except BaseException:
            await self._pool.putconn(conn)
            raise
        return conn

    async def _unlock(self, model: str, conn: AsyncConnection) -> None:
        try:
            await conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (LOCK_CLASS, model))
        except Exception as exc:  # a broken connection releases its locks when it closes
            log.warning("%s: releasing the lifecycle lock failed: %s", model, exc)
        finally:
            await self._pool.putconn(conn)


def _serves_as(rows: list[Row], version: int, mode: Mode, pct: float) -> bool:
    """Whether ``version`` already serves in the role ``mode`` asks for."""
    mine = [r for r in rows if r.version == str(version)]
    if mode == "shadow":
        return any(r.is_shadow for r in mine)
    arms = [r for r in mine if not r.is_shadow]
    if mode == "promote":
        return any(r.traffic_pct >= 100 for r in arms) and len(swaps.arms(rows)) == 1
    return any(abs(r.traffic_pct - pct) < 1e-6 for r in arms)


@asynccontextmanager
async def open_deployer(
    settings: Settings,
    *,
    wait_s: float | None = None,
    registry: CollectorRegistry | None = None,
) -> AsyncIterator[Deployer]:
    """A model deployer over its own Postgres pool (the catalog database) and Triton's
    repository API at ``gateway.triton_grpc_url``; closed with its pool and client.

    ``wait_s``: wait that long for the first connection (raises ``PoolTimeout``); by default
    the pool connects in the background. ``registry``: where its metrics are registered.
    """
    gw = settings.gateway
    # a change in progress holds its model's advisory lock on one connection through the
    # drain; history and catalog reads need their own
    pool = catalog_pool(settings, "deployer", 2 * len(settings.lifecycle.managed_models) + 2)
    triton = TritonRepository(gw.triton_grpc_url, load_timeout_s=settings.lifecycle.load_timeout_s)
    deployer: Deployer | None = None
    try:
        if wait_s is None:
            await pool.open(wait=False)
        else:
            await pool.open(wait=True, timeout=wait_s)
        deployer = Deployer(settings, pool=pool, triton=triton, metrics=LifecycleMetrics(registry))
        yield deployer
    finally:
        if deployer is not None:
            await deployer.close()
        await pool.close()
        await triton.close()
