"""MLflow rollout: registry events -> deploys, by webhook and by a reconcile loop.

The convention (``docs/lifecycle.md``, "MLflow rollout"):

* a new version (``model_version.created``) does ``lifecycle.on_register`` (shadow by
  default; ``none`` = nothing), for the newest version only: an older version created late
  is recorded ``superseded``;
* alias ``champion`` -> promote that version; ``canary`` -> canary with the version tag
  ``rtinfer.traffic_pct`` (default ``lifecycle.canary_pct``); ``challenger`` -> shadow with
  the version tag ``rtinfer.shadow_sample_pct`` (default 100). Other aliases, and deleting an
  alias, are recorded and change nothing.
* only ``lifecycle.managed_models`` are acted on; other models are recorded ``ignored``.

Each state is claimed in ``registry_applied`` (``sync_store``) before its deploy, so the
webhook and the reconcile loop deploy it once, and a failed deploy is recorded ``failed`` and
not retried; a new version or a moved alias acts again."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter

from gateway.catalog.rollout_store import CREATED, PENDING, SyncStore, alias_kind
from gateway.errors import GatewayError
from gateway.lifecycle.config import LifecycleSettings
from gateway.lifecycle.deployer import DeployRequest, Outcome
from gateway.lifecycle.errors import NothingToDo
from gateway.lifecycle.mlflow_hooks import RegistryEvent
from gateway.lifecycle.mlflow_registry import ModelListing, VersionInfo
from gateway.lifecycle.rollout_plan import Action, Pending, action_for, plan_reconcile

log = logging.getLogger(__name__)


WEBHOOK_TRIGGER = "mlflow-webhook"


RECONCILE_TRIGGER = "mlflow-reconcile"


class Registry(Protocol):
    """The blocking registry calls the sync needs (``mlflow_registry.MlflowRegistry``)."""

    def listing(self, model: str) -> ModelListing: ...

    def version(self, model: str, version: int) -> VersionInfo: ...

    def download(self, info: VersionInfo, dst: Path) -> Path: ...


class Deploys(Protocol):
    """The part of ``deployer.Deployer`` the sync calls."""

    async def deploy(self, req: DeployRequest) -> Outcome: ...


class SyncMetrics:
    """Counters of the rollout, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "rtinfer_deployer_webhook_deliveries",
            "MLflow webhook deliveries by outcome (accepted, duplicate, ignored, rejected, "
            "invalid).",
            ["outcome"],
            registry=registry,
        )
        self.reconcile_runs = Counter(
            "rtinfer_deployer_reconcile_runs",
            "Registry reconcile passes by result (ok, error).",
            ["result"],
            registry=registry,
        )
        self.applied = Counter(
            "rtinfer_deployer_registry_applied",
            "Registry states handled, by kind (created, alias) and outcome (promoted, canary, "
            "shadow, unchanged, failed, ignored, superseded, alias_deleted).",
            ["kind", "outcome"],
            registry=registry,
        )
        self.task_failures = Counter(
            "rtinfer_deployer_sync_task_failures",
            "Background webhook handlings that raised (the reconcile loop retries them).",
            registry=registry,
        )


def _error_detail(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, GatewayError):
        return {"error": exc.message, "code": exc.code}
    return {"error": str(exc) or type(exc).__name__, "code": type(exc).__name__}


class RegistrySync:
    """Applies registry states through the deployer: per webhook event and periodically."""

    def __init__(
        self,
        lifecycle: LifecycleSettings,
        deployer: Deploys,
        store: SyncStore,
        registry: Registry,
        metrics: SyncMetrics,
    ) -> None:
        self.lifecycle = lifecycle
        self.deployer = deployer
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    def _lock(self, model: str) -> asyncio.Lock:
        return self._locks.setdefault(model, asyncio.Lock())

    # --- webhook ------------------------------------------------------------------------

    def submit(self, event: RegistryEvent) -> None:
        """Handle ``event`` in the background; the task is kept and awaited on close."""
        task = asyncio.create_task(self._handle_logged(event), name=f"mlflow-{event.delivery_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle_logged(self, event: RegistryEvent) -> None:
        try:
            await self.handle(event)
        except Exception:
            self.metrics.task_failures.inc()
            log.exception("handling MLflow delivery %s (%s) failed", event.delivery_id, event.event)

    async def handle(self, event: RegistryEvent) -> None:
        """Apply one webhook event (a no-op for events the rollout does not act on)."""
        extra = {"delivery_id": event.delivery_id}
        if event.event == "model_version.created" and event.version is not None:
            await self.apply(event.model, CREATED, event.version, WEBHOOK_TRIGGER, extra)
        elif event.event == "model_version_alias.created" and event.alias and event.version:
            kind = alias_kind(event.alias)
            await self.apply(event.model, kind, event.version, WEBHOOK_TRIGGER, extra)
        elif event.event == "model_version_alias.deleted" and event.alias:
            await self._record(
                event.model, alias_kind(event.alias), None, "alias_deleted", WEBHOOK_TRIGGER, extra
            )

    # --- reconcile ----------------------------------------------------------------------

    async def reconcile(self) -> list[Pending]:
        """One pass: apply what the registry holds and ``registry_applied`` does not."""
        models = self.lifecycle.managed_models
        listings: list[ModelListing] = []
        for model in models:
            listings.append(await asyncio.to_thread(self.registry.listing, model))
        pending = plan_reconcile(listings, await self.store.applied_state(models))
        by_model = {listing.model: listing for listing in listings}
        for item in pending:
            if item.record_only is not None or item.version is None:
                await self._record(
                    item.model,
                    item.kind,
                    item.version,
                    item.record_only or "alias_deleted",
                    RECONCILE_TRIGGER,
                    {},
                )
                continue
            info = by_model[item.model].versions.get(item.version)
            await self.apply(item.model, item.kind, item.version, RECONCILE_TRIGGER, {}, info)
        return pending

    async def run(self) -> None:
        """Reconcile now and every ``reconcile_interval_s`` until cancelled."""
        while True:
            try:
                pending = await self.reconcile()
            except Exception:
                self.metrics.reconcile_runs.labels("error").inc()
                log.exception("registry reconcile failed")
            else:
                self.metrics.reconcile_runs.labels("ok").inc()
                if pending:
                    log.info("registry reconcile handled %d state(s)", len(pending))
            await asyncio.sleep(self.lifecycle.reconcile_interval_s)

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self.run(), name="registry-reconcile")

    async def close(self) -> None:
        """Stop the loop and wait for webhook work in progress."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- applying one state -------------------------------------------------------------

    async def _record(
        self,
        model: str,
        kind: str,
        version: int | None,
        outcome: str,
        trigger: str,
        detail: Mapping[str, Any],
    ) -> str | None:
        """Record a state handled without a deploy (deleted alias, superseded version)."""
        async with self._lock(model):
            return await self._claim_done(model, kind, version, outcome, trigger, detail)

    async def apply(
        self,
        model: str,
        kind: str,
        version: int,
        trigger: str,
        extra: Mapping[str, Any],
        info: VersionInfo | None = None,
    ) -> str | None:
        """Deploy one registry state unless it was handled; the outcome, None if it was."""
        alias = None if kind == CREATED else kind.partition(":")[2]
        async with self._lock(model):
            if model not in self.lifecycle.managed_models:
                reason = {"reason": f"{model} is not a managed model", **extra}
                return await self._claim_done(model, kind, version, "ignored", trigger, reason)
            if kind == CREATED:
                newest = await self.store.newest_created(model)
                if newest is not None and newest > version:
                    reason = {"reason": f"version {newest} was registered later", **extra}
                    return await self._claim_done(
                        model, kind, version, "superseded", trigger, reason
                    )
            if info is None:
                info = await asyncio.to_thread(self.registry.version, model, version)
            action = action_for(self.lifecycle, model, version, alias, info.tags)
            detail = {"mlflow_run_id": info.run_id, "source": info.source, **extra}
            if action.mode is None:
                detail["reason"] = action.reason
                return await self._claim_done(model, kind, version, "ignored", trigger, detail)
            claim = await self.store.claim(
                model, kind, version, trigger=trigger, outcome=PENDING, detail=detail
            )
            if claim is None:
                log.info("%s %s version %d: already handled", model, kind, version)
                return None
            outcome, result = await self._deploy(action, info, trigger, detail)
            await self.store.finish(claim, outcome, result)
        self.metrics.applied.labels(kind.partition(":")[0], outcome).inc()
        return outcome

    async def _claim_done(
        self,
        model: str,
        kind: str,
        version: int | None,
        outcome: str,
        trigger: str,
        detail: Mapping[str, Any],
    ) -> str | None:
        claimed = await self.store.claim(
            model, kind, version, trigger=trigger, outcome=outcome, detail=detail
        )
        if claimed is None:
            return None
        self.metrics.applied.labels(kind.partition(":")[0], outcome).inc()
        log.info("%s %s version %s: %s (%s)", model, kind, version, outcome, detail.get("reason"))
        return outcome

    async def _deploy(
        self, action: Action, info: VersionInfo, trigger: str, detail: Mapping[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        """Run the deploy; ``(outcome, detail)`` - a failure is an outcome, not an exception."""
        assert action.mode is not None
        try:
            with tempfile.TemporaryDirectory(prefix="rtinfer-mlflow-") as tmp:
                # always MLflow's files: the deployer reuses an identical directory already in
                # the repository and refuses (version_exists) a different one
                source = await asyncio.to_thread(self.registry.download, info, Path(tmp))
                outcome = await self.deployer.deploy(
                    DeployRequest(
                        model=action.model,
                        version=action.version,
                        mode=action.mode,
                        source=source,
                        traffic_pct=action.traffic_pct,
                        trigger=trigger,
                        detail={"registry_kind": action.kind, **detail},
                    )
                )
        except NothingToDo as exc:  # e.g. a registered version that already serves production
            log.info("%s %s version %d: %s", action.model, action.kind, action.version, exc)
            return "unchanged", {"reason": exc.message}
        except Exception as exc:
            log.warning(
                "%s %s version %d: %s failed: %s",
                action.model,
                action.kind,
                action.version,
                action.mode,
                _error_detail(exc)["error"],
            )
            return "failed", _error_detail(exc)
        log.info("%s %s version %d: %s", action.model, action.kind, action.version, outcome.action)
        return outcome.action, {"deploy": outcome.as_dict()}
