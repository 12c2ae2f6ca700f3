"""Per-model health turning degraded on a real outage, and the request budget reaching Triton.

Both pause the session stack's Redis (SIGSTOP through its supervisor, so nothing restarts
it) while an in-process gateway serves: the assembler's feature fetches time out, answers are
degraded, and the postprocess step re-scores them with its BLS fallback call - whose time
limit is the request's remaining budget.
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest

from gateway.catalog.dsn import dsn
from gateway.config import GatewaySettings
from gateway.http.app import create_app
from gateway.http.deps import GatewayDeps
from gateway.settings import Settings
from python_backend.predlog.sink import DiscardPredictionLog
from rtinfer.stack import StackState
from rtinfer.supervisor import Supervisor

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(120)]

MODEL = "fraud_xgb"


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture()
def redis_paused(stack_settings: Settings) -> Iterator[None]:
    supervisor = Supervisor(stack_settings.state_dir)
    supervisor.signal("redis", signal.SIGSTOP)
    try:
        yield
    finally:
        supervisor.signal("redis", signal.SIGCONT)


@asynccontextmanager
async def in_process_gateway(
    live_settings: Settings, running_stack: StackState
) -> AsyncIterator[httpx.AsyncClient]:
    assert running_stack.postgres is not None
    gw = GatewaySettings(
        triton_grpc_url=running_stack.triton_ports.grpc_url,
        postgres_dsn=dsn(
            live_settings.state_dir / "postgres", running_stack.postgres.port
        ).conninfo,
        auth="none",
        health_check_ttl_s=0.5,
    )
    app = create_app(
        live_settings.model_copy(update={"gateway": gw}),
        GatewayDeps(prediction_log=DiscardPredictionLog()),
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c,
    ):
        yield c


def body(i: int, deadline_ms: int = 100) -> dict[str, object]:
    # distinct users: the assembler's hot-entity cache must not answer for Redis
    return {
        "entity_ids": {"user_id": f"u_{(7000 + i) % 20000:06d}", "merchant_id": "m_00042"},
        "context": {"amount": 42.0, "hour_of_day": 3},
        "deadline_ms": deadline_ms,
    }


async def health(client: httpx.AsyncClient) -> dict[str, object]:
    r = await client.get(f"/predict/{MODEL}/health")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_health_turns_degraded_while_the_feature_store_is_down_then_ok(
    live_settings: Settings, running_stack: StackState, stack_settings: Settings
) -> None:
    async with in_process_gateway(live_settings, running_stack) as client:
        assert (await health(client))["status"] == "ok"
        supervisor = Supervisor(stack_settings.state_dir)
        supervisor.signal("redis", signal.SIGSTOP)
        try:
            for i in range(20):
                r = await client.post(f"/predict/{MODEL}", json=body(i))
                assert r.status_code == 200 and r.json()["degraded"], r.text
            await asyncio.sleep(0.6)  # past the health checks' ttl
            seen = await health(client)
        finally:
            supervisor.signal("redis", signal.SIGCONT)
        assert seen["status"] == "degraded", seen
        reasons = " | ".join(seen["reasons"])  # type: ignore[arg-type]
        assert "feature store unavailable" in reasons, reasons
        assert "answers degraded: feature_store_unavailable" in reasons, reasons
        assert seen["feature_store"]["status"] == "unavailable"  # type: ignore[index]
        assert seen["degraded_rate_1m"] == pytest.approx(20 / 20)

        deadline = time.monotonic() + 20
        while (seen := await health(client))["status"] != "ok" or seen["feature_store"][
            "status"  # type: ignore[index]
        ] != "ok":
            # still "degraded" by the minute's degraded share until enough good answers
            for i in range(40):
                await client.post(f"/predict/{MODEL}", json=body(100 + i))
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.6)


def _budget_gauge(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("rtinfer_fallback_budget_us{") and f'"{MODEL}_postprocess"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no rtinfer_fallback_budget_us gauge of the postprocess step")


async def test_the_remaining_budget_bounds_the_fallback_call_in_triton(
    live_settings: Settings, running_stack: StackState, redis_paused: None
) -> None:
    ports = running_stack.triton_ports
    metrics_url = f"http://{ports.host}:{ports.metrics}/metrics"
    async with in_process_gateway(live_settings, running_stack) as client:
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 1.5:  # the stub publishes its metrics once a second
            r = await client.post(f"/predict/{MODEL}", json=body(200 + i, deadline_ms=30))
            assert r.status_code == 200, r.text
            i += 1
        budget_us = await asyncio.to_thread(_budget_gauge, metrics_url)
    # the gateway sent what was left of 30 ms, below the step's own 50 ms cap
    assert 0 < budget_us <= 30_000, budget_us
