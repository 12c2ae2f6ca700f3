"""The swap procedure end to end: real Triton, Postgres catalog and an in-process gateway under a
closed-loop load, on the lifecycle stack (its own repository copy; drain 1 s).

Versions are numbered from 2 up in test order; each test starts from whatever the previous one
left serving, which the tests read rather than assume.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool

from gateway.catalog.dsn import dsn
from gateway.config import GatewaySettings
from gateway.http.app import create_app
from gateway.http.deps import GatewayDeps
from gateway.lifecycle.artifacts import copy_artifacts
from gateway.lifecycle.deployer import Deployer, DeployRequest
from gateway.lifecycle.errors import ArtifactInvalid, ModelLoadFailed
from gateway.lifecycle.triton_repo import TritonRepository
from gateway.lifecycle.watcher import VersionWatcher
from gateway.repository.layout import SERVING_FILE, Serving
from gateway.settings import Settings
from rtinfer.loadloop import LoadLoop, Sample, Summary, first_answer, flips_back
from rtinfer.stack import StackState

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(300)]

MODEL = "fraud_xgb"
_numbers = itertools.count(2)


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def settings(lifecycle_stack: StackState, lifecycle_settings: Settings) -> Settings:
    assert lifecycle_stack.postgres is not None
    conninfo = dsn(lifecycle_settings.state_dir / "postgres", lifecycle_stack.postgres.port)
    gw = GatewaySettings(
        triton_grpc_url=lifecycle_stack.triton_ports.grpc_url,
        postgres_dsn=conninfo.conninfo,
        default_deadline_ms=5000,  # a busy 2-core box must not turn answers into fallbacks
        auth="none",
        prediction_log="discard",
    )
    return lifecycle_settings.model_copy(update={"gateway": gw})


@dataclass
class Rig:
    deployer: Deployer
    triton: TritonRepository
    client: httpx.AsyncClient
    repository: Path

    def candidate(self, tmp: Path, *, from_version: int | None = None) -> tuple[int, Path]:
        """A new version number and a candidate directory (the champion's files)."""
        source = from_version or Serving.load(self.repository, MODEL).champion
        version = next(_numbers)
        while (self.repository / MODEL / str(version)).exists():
            version = next(_numbers)
        return version, copy_artifacts(self.repository / MODEL / str(source), tmp / f"c{version}")

    async def served_version(self) -> str:
        r = await self.client.get(f"/models/{MODEL}")
        assert r.status_code == 200, r.text
        arms = [d for d in r.json()["deployments"] if not d["is_shadow"]]
        return str(max(arms, key=lambda d: d["traffic_pct"])["model_version"])


@pytest.fixture()
async def rig(settings: Settings, lifecycle_stack: StackState) -> AsyncIterator[Rig]:
    gw = settings.gateway
    assert gw.postgres_dsn is not None
    pool = AsyncConnectionPool(
        gw.postgres_dsn.get_secret_value(),
        min_size=1,
        max_size=4,
        open=False,
        kwargs={"autocommit": True},
    )
    await pool.open()
    triton = TritonRepository(lifecycle_stack.triton_ports.grpc_url)
    deployer = Deployer(settings, pool=pool, triton=triton)
    app = create_app(settings, GatewayDeps(deployer=deployer))
    transport = httpx.ASGITransport(app=app)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://gateway") as client,
        ):
            yield Rig(deployer, triton, client, settings.triton.model_repository)
            await deployer.wait_settled(120)
    finally:
        await deployer.close()
        await triton.close()
        await pool.close()


def _only_feature_timeouts(samples: list[Sample]) -> bool:
    """No answer fell back because a model was missing: the only degraded answers are feature
    fetches that timed out while Triton loaded models on the same two cores. Those are
    re-scored inside Triton by the context-only model, or - when that call misses the
    request's remaining budget - get the class prior."""
    reasons = {s.degraded_reason for s in samples if s.degraded_reason}
    assert reasons <= {
        "feature_store_unavailable:fraud_context_lr",
        "feature_store_unavailable:class_prior",
    }, reasons
    return True


async def _catalog_switch(rig: Rig, version: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await rig.served_version() != version:
        assert time.monotonic() < deadline, f"catalog never switched to {version}"
        await asyncio.sleep(0.02)


async def test_new_version_serves_under_load_with_zero_failures_and_switches_once(
    rig: Rig, tmp_path: Path
) -> None:
    old = await rig.served_version()
    version, source = rig.candidate(tmp_path)
    async with LoadLoop(rig.client, MODEL, concurrency=4) as load:
        await asyncio.sleep(1.0)
        started = time.monotonic()
        outcome = await rig.deployer.deploy(
            DeployRequest(MODEL, version, source=source, trigger="test")
        )
        await _catalog_switch(rig, str(version))
        await rig.deployer.wait_settled(120)
        await asyncio.sleep(0.5)
    first = first_answer(load.samples, str(version))
    assert first is not None, Summary.of(load.samples)
    summary = Summary.of(load.samples)
    print(
        f"\nregistration->serving {first.finished - started:.2f}s, outcome {outcome.timings_ms}, "
        f"load {summary}"
    )
    assert outcome.action == "promoted" and outcome.previous_version == old
    assert summary.non_2xx == 0, summary
    assert _only_feature_timeouts(load.samples)
    assert flips_back(load.samples, old, str(version)) == []
    assert set(summary.versions) == {old, str(version)}
    ready = await rig.triton.ready_versions(MODEL)
    assert ready == [version], "the replaced version is unloaded after the drain"
    assert await rig.triton.server_ready()


async def test_ten_swaps_under_load_have_no_failed_request(rig: Rig, tmp_path: Path) -> None:
    async with LoadLoop(rig.client, MODEL, concurrency=4) as load:
        await asyncio.sleep(1.0)
        swaps: list[tuple[float, float]] = []
        for _ in range(10):
            version, source = rig.candidate(tmp_path)
            started = time.monotonic()
            await rig.deployer.deploy(DeployRequest(MODEL, version, source=source, trigger="test"))
            await rig.deployer.wait_settled(120)
            swaps.append((started, time.monotonic()))
            shutil.rmtree(source)
        await asyncio.sleep(0.5)
    during = [s for a, b in swaps for s in load.between(a, b)]
    summary = Summary.of(load.samples)
    print(f"\n10 swaps: all {summary}; during swaps {Summary.of(during)}")
    assert summary.non_2xx == 0, summary
    assert _only_feature_timeouts(load.samples)
    assert len(summary.versions) == 11
    assert await rig.triton.ready_versions(MODEL) == [version]


async def _history(rig: Rig) -> list[dict[str, Any]]:
    r = await rig.client.get(f"/models/{MODEL}")
    assert r.status_code == 200, r.text
    return list(r.json()["history"])


@pytest.fixture()
def catalog_rows(settings: Settings) -> Iterator[Any]:
    import psycopg

    assert settings.gateway.postgres_dsn is not None
    conninfo = settings.gateway.postgres_dsn.get_secret_value()

    def rows() -> list[tuple[Any, ...]]:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            return conn.execute(
                "SELECT deployment_id, model_version, traffic_pct FROM model_deployments "
                "WHERE model_name = %s AND is_active ORDER BY deployment_id",
                (MODEL,),
            ).fetchall()

    yield rows


@pytest.mark.parametrize("breakage", ["corrupt_onnx", "wrong_input_name", "initialize_raises"])
async def test_broken_version_leaves_the_old_one_serving_and_the_failure_visible(
    rig: Rig, tmp_path: Path, catalog_rows: Any, breakage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before_rows = catalog_rows()
    serving_before = (rig.repository / MODEL / SERVING_FILE).read_bytes()
    old = await rig.served_version()
    version, source = rig.candidate(tmp_path)
    expected: type[Exception] = ArtifactInvalid
    if breakage == "corrupt_onnx":
        (source / "model.onnx").write_bytes(b"\x08\x07 not a protobuf graph")
    elif breakage == "wrong_input_name":
        metadata = json.loads((source / "metadata.json").read_text())
        metadata["input_name"] = "dense_input"
        (source / "metadata.json").write_text(json.dumps(metadata))
    else:
        # passes validation, then the python model's initialize raises inside Triton: the
        # file is damaged between validation and load
        import gateway.lifecycle.swap as swap_module

        real = swap_module.materialize_version

        def damaged(*args: Any, **kwargs: Any) -> Any:
            report = real(*args, **kwargs)
            (report.path / "model.onnx").write_bytes(b"damaged after validation")
            return report

        monkeypatch.setattr(swap_module, "materialize_version", damaged)
        expected = ModelLoadFailed
    async with LoadLoop(rig.client, MODEL, concurrency=2) as load:
        with pytest.raises(expected) as failure:
            await rig.deployer.deploy(DeployRequest(MODEL, version, source=source, trigger="test"))
        await asyncio.sleep(0.3)
    summary = Summary.of(load.samples)
    assert summary.non_2xx == 0 and summary.versions == {old: summary.requests}, summary
    assert catalog_rows() == before_rows
    assert (rig.repository / MODEL / SERVING_FILE).read_bytes() == serving_before
    assert not (rig.repository / MODEL / str(version)).exists()
    assert await rig.triton.ready_versions(MODEL) == [int(old)]
    assert await rig.triton.server_ready(), "a refused version must not leave Triton not ready"
    history = await _history(rig)
    failed = next(h for h in history if h["action"] == "deploy_failed")
    assert failed["detail"]["version"] == version
    assert failed["detail"]["error"] == failure.value.message
    if breakage == "initialize_raises":
        assert failed["detail"]["step"] == "load"


async def test_canary_then_promote_then_rollback_with_traffic_measured(
    rig: Rig, tmp_path: Path
) -> None:
    old = await rig.served_version()
    version, source = rig.candidate(tmp_path)
    shares: dict[str, dict[str, int]] = {}

    async def measure(step: str) -> dict[str, int]:
        async with LoadLoop(rig.client, MODEL, concurrency=4, users=2000) as load:
            while len(load.samples) < 1000:
                await asyncio.sleep(0.05)
        summary = Summary.of(load.samples)
        assert summary.non_2xx == 0, summary
        shares[step] = summary.versions
        return summary.versions

    outcome = await rig.deployer.deploy(
        DeployRequest(MODEL, version, mode="canary", traffic_pct=10, source=source, trigger="test")
    )
    assert outcome.action == "canary"
    await rig.deployer.wait_settled(60)
    await asyncio.sleep(0.5)  # NOTIFY reaches the in-process gateway
    canary = await measure("canary 10%")
    share = canary.get(str(version), 0) / sum(canary.values())
    assert 0.05 <= share <= 0.15, shares

    outcome = await rig.deployer.promote(MODEL, trigger="test")
    assert outcome.version == version and outcome.action == "promoted"
    await rig.deployer.wait_settled(60)
    await asyncio.sleep(0.5)
    assert set(await measure("promoted")) == {str(version)}, shares

    outcome = await rig.deployer.rollback(MODEL, trigger="test")
    assert outcome.action == "rolled_back" and outcome.version == int(old)
    await rig.deployer.wait_settled(60)
    await asyncio.sleep(0.5)
    assert set(await measure("rolled back")) == {old}, shares
    print(f"\ntraffic by step: {shares}")
    assert await rig.triton.ready_versions(MODEL) == [int(old)]


async def test_dropped_directory_is_deployed_once_and_only_after_it_is_complete(
    rig: Rig, settings: Settings
) -> None:
    model_dir = rig.repository / MODEL
    champion = model_dir / str(Serving.load(rig.repository, MODEL).champion)
    version = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()) + 1
    target = model_dir / str(version)
    settle = settings.lifecycle.watch_settle_s
    # asking for the version before it exists is refused and does not count as an attempt
    with pytest.raises(ArtifactInvalid, match="no directory"):
        await rig.deployer.deploy(DeployRequest(MODEL, version, trigger="test"))
    assert not await rig.deployer.attempted(MODEL, version)
    watcher = VersionWatcher(settings, rig.deployer)
    await watcher.start()
    try:
        target.mkdir()
        for name in ("metadata.json", "feature_spec.json", "training_stats.json"):
            shutil.copyfile(champion / name, target / name)
        await asyncio.sleep(settle + 1.5)  # settled, but the declared model files are missing
        assert not await rig.deployer.attempted(MODEL, version)

        shutil.copyfile(champion / "xgboost.json", target / "xgboost.json")
        onnx = (champion / "model.onnx").read_bytes()
        with (target / "model.onnx").open("wb") as fh:  # a slow copy: half, a pause, the rest
            fh.write(onnx[: len(onnx) // 2])
            fh.flush()
            await asyncio.sleep(settle / 2)
            assert not await rig.deployer.attempted(MODEL, version)
            fh.write(onnx[len(onnx) // 2 :])
        completed = time.monotonic()
        await _catalog_switch(rig, str(version), timeout_s=settle + 30)
        print(f"\ndropped directory serving {time.monotonic() - completed:.2f}s after completion")
        await rig.deployer.wait_settled(120)
        await asyncio.sleep(settle + 1.5)  # more scans: nothing deploys it a second time
    finally:
        await watcher.close()
    starts = [
        h
        for h in await rig.deployer.history(MODEL, limit=50)
        if h.action == "deploy_started" and h.detail.get("version") == version
    ]
    assert len(starts) == 1 and starts[0].detail["trigger"] == "watcher"
    assert await rig.triton.ready_versions(MODEL) == [version]
