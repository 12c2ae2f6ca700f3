"""MLflow rollout end to end on the lifecycle stack: versions registered in the real MLflow
server reach Triton and the catalog through the deployer service, by signed webhook
(MLflow -> ``POST /hooks/mlflow``) and by the reconcile loop, each state exactly once.

Works on ``fraud_nn`` (the swap tests use ``fraud_xgb``); MLflow version numbers are Triton's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from mlflow import MlflowClient
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool

from gateway.catalog.dsn import dsn
from gateway.catalog.rollout_store import SyncStore
from gateway.config import GatewaySettings
from gateway.http.app import create_app
from gateway.http.deps import GatewayDeps
from gateway.lifecycle.artifacts import copy_artifacts
from gateway.lifecycle.deployer import Deployer
from gateway.lifecycle.mlflow_registry import MlflowRegistry, ensure_webhook
from gateway.lifecycle.registry_sync import RegistrySync, SyncMetrics
from gateway.lifecycle.service import create_deployer_app
from gateway.lifecycle.triton_repo import TritonRepository
from gateway.settings import Settings
from python_backend.feature_spec import METADATA_FILE, ModelMetadata
from rtinfer.loadloop import LoadLoop, Summary, first_answer, flips_back
from rtinfer.procs import free_port
from rtinfer.registry import register_version
from rtinfer.stack import StackState

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(300)]

MODEL = "fraud_nn"


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Rollout:
    settings: Settings
    pool: AsyncConnectionPool
    deployer: Deployer
    sync: RegistrySync
    mlflow: MlflowClient
    tracking_uri: str
    hook_url: str
    server: uvicorn.Server
    serving: asyncio.Task[None]

    async def register(self, tmp: Path, training_version: int) -> str:
        """Register a copy of the repository's version 1 as a new MLflow version."""
        repo = self.settings.triton.model_repository
        candidate = copy_artifacts(repo / MODEL / "1", tmp / f"candidate-{training_version}")
        if training_version != 1:  # different content -> a new registered version
            meta = ModelMetadata.load(candidate / METADATA_FILE)
            meta.version = training_version
            meta.save(candidate / METADATA_FILE)
        reg = await asyncio.to_thread(register_version, self.tracking_uri, candidate, MODEL)
        return reg.version

    async def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, args)
            return await cur.fetchall()

    async def applied(self, kind: str, version: int, timeout_s: float = 120.0) -> tuple[str, str]:
        """Outcome and trigger of a registry state, once it is no longer pending."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = await self.rows(
                "SELECT outcome, trigger FROM registry_applied WHERE model_name = %s AND kind = %s "
                "AND model_version = %s ORDER BY id DESC LIMIT 1",
                MODEL,
                kind,
                version,
            )
            if found and found[0][0] != "pending":
                return str(found[0][0]), str(found[0][1])
            assert time.monotonic() < deadline, f"{kind} {version} not applied: {found}"
            await asyncio.sleep(0.2)

    async def champion(self) -> str:
        found = await self.rows(
            "SELECT model_version FROM model_deployments WHERE model_name = %s AND is_active "
            "AND NOT is_shadow AND traffic_pct = 100",
            MODEL,
        )
        assert len(found) == 1, found
        return str(found[0][0])

    async def deploys_started(self, version: int) -> int:
        found = await self.rows(
            "SELECT count(*) FROM model_deployment_history WHERE model_name = %s "
            "AND action = 'deploy_started' AND detail->>'version' = %s",
            MODEL,
            str(version),
        )
        return int(found[0][0])


@pytest.fixture()
async def rollout(
    lifecycle_stack: StackState, lifecycle_settings: Settings
) -> AsyncIterator[Rollout]:
    assert lifecycle_stack.postgres is not None and lifecycle_stack.mlflow_uri is not None
    conninfo = dsn(lifecycle_settings.state_dir / "postgres", lifecycle_stack.postgres.port)
    port = free_port()
    settings = lifecycle_settings.model_copy(
        update={
            "gateway": GatewaySettings(
                triton_grpc_url=lifecycle_stack.triton_ports.grpc_url,
                postgres_dsn=conninfo.conninfo,
            ),
            "lifecycle": lifecycle_settings.lifecycle.model_copy(
                update={
                    "managed_models": (MODEL,),
                    "reconcile_interval_s": 3600.0,  # the test calls reconcile itself
                    "deployer_port": port,
                }
            ),
        }
    )
    pool = AsyncConnectionPool(
        conninfo.conninfo, min_size=1, max_size=6, open=False, kwargs={"autocommit": True}
    )
    await pool.open()
    triton = TritonRepository(lifecycle_stack.triton_ports.grpc_url)
    deployer = Deployer(settings, pool=pool, triton=triton)
    registry = CollectorRegistry()
    sync = RegistrySync(
        settings.lifecycle,
        deployer,
        SyncStore(pool),
        MlflowRegistry(lifecycle_stack.mlflow_uri),
        SyncMetrics(registry),
    )
    app = create_deployer_app(settings, deployer, sync, metrics_registry=registry)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done(), "the deployer app did not start"
            await asyncio.sleep(0.05)
        hook_url = f"http://127.0.0.1:{port}/hooks/mlflow"
        secret = settings.lifecycle.webhook_secret.get_secret_value()  # type: ignore[union-attr]
        await asyncio.to_thread(ensure_webhook, lifecycle_stack.mlflow_uri, hook_url, secret)
        client = MlflowClient(lifecycle_stack.mlflow_uri, lifecycle_stack.mlflow_uri)
        yield Rollout(
            settings,
            pool,
            deployer,
            sync,
            client,
            lifecycle_stack.mlflow_uri,
            hook_url,
            server,
            serving,
        )
        await deployer.wait_settled(60)
    finally:
        server.should_exit = True
        await serving
        await deployer.close()
        await triton.close()
        await pool.close()


@asynccontextmanager
async def gateway_client(rollout: Rollout) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process gateway on the lifecycle stack's catalog and Triton."""
    gw = rollout.settings.gateway.model_copy(
        update={"auth": "none", "prediction_log": "discard", "default_deadline_ms": 5000}
    )
    app = create_app(
        rollout.settings.model_copy(update={"gateway": gw}),
        GatewayDeps(deployer=rollout.deployer),
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway"
        ) as client,
    ):
        yield client


async def test_registry_events_roll_out_once_by_webhook_and_by_reconcile(
    rollout: Rollout, tmp_path: Path
) -> None:
    # the webhook is registered once, whatever the number of calls
    secret = rollout.settings.lifecycle.webhook_secret.get_secret_value()  # type: ignore[union-attr]
    again = await asyncio.to_thread(ensure_webhook, rollout.tracking_uri, rollout.hook_url, secret)
    hooks = [h for h in rollout.mlflow.list_webhooks() if h.url == rollout.hook_url]
    assert [h.webhook_id for h in hooks] == [again]

    # 1. version 1 (already in production) is unchanged; a new version 2 only shadows: it is
    # mirrored to, never answers
    assert await rollout.register(tmp_path, 1) == "1"
    assert await rollout.applied("created", 1) == ("unchanged", "mlflow-webhook")
    assert await rollout.register(tmp_path, 2) == "2"
    assert await rollout.applied("created", 2) == ("shadow", "mlflow-webhook")
    assert await rollout.champion() == "1"
    shadows = await rollout.rows(
        "SELECT model_version FROM model_deployments WHERE model_name = %s AND is_active "
        "AND is_shadow",
        MODEL,
    )
    assert shadows == [("2",)]

    # 2. the champion alias on version 2 promotes it: served within seconds while a load runs
    # through a gateway, without a failed request
    async with gateway_client(rollout) as client, LoadLoop(client, MODEL, concurrency=4) as load:
        await asyncio.sleep(0.5)
        started = time.monotonic()
        await asyncio.to_thread(rollout.mlflow.set_registered_model_alias, MODEL, "champion", "2")
        while first_answer(load.samples, "2") is None:
            assert time.monotonic() - started < 60, Summary.of(load.samples)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
    first = first_answer(load.samples, "2")
    assert first is not None
    summary = Summary.of(load.samples)
    print(f"\nMLflow champion alias -> serving {first.finished - started:.2f}s; load {summary}")
    assert summary.non_2xx == 0, summary
    assert flips_back(load.samples, "1", "2") == []
    assert await rollout.applied("alias:champion", 2) == ("promoted", "mlflow-webhook")
    assert await rollout.champion() == "2"
    deliveries = await rollout.rows(
        "SELECT event, model_version FROM mlflow_webhook_deliveries WHERE model_name = %s",
        MODEL,
    )
    assert ("model_version.created", 2) in deliveries

    # 3. the champion alias moved back to version 1 (a rollback decided in the registry)
    await asyncio.to_thread(rollout.mlflow.set_registered_model_alias, MODEL, "champion", "1")
    assert await rollout.applied("alias:champion", 1) == ("promoted", "mlflow-webhook")
    assert await rollout.champion() == "1"

    # 4. a version registered while the webhook receiver is down is found by reconcile (and,
    # like any new version, shadows)
    rollout.server.should_exit = True
    await asyncio.wait_for(rollout.serving, 60)
    assert await rollout.register(tmp_path, 3) == "3"
    await rollout.sync.reconcile()
    assert await rollout.applied("created", 3) == ("shadow", "mlflow-reconcile")
    assert await rollout.champion() == "1"

    # every state was applied once: nothing left to do; version 2 was deployed twice
    # (shadow, then champion), version 3 once
    assert await rollout.sync.reconcile() == []
    assert [await rollout.deploys_started(v) for v in (2, 3)] == [2, 1]
