"""The lifecycle admin routes and the history of GET /models/{name}, through ``create_app``
with a fake deployer, a fake catalog and a fake key check."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from pydantic import SecretStr

import gateway.http.app
from gateway.catalog.records import Deployment
from gateway.catalog.snapshot import CatalogSnapshot
from gateway.catalog.swaps import HistoryEntry
from gateway.errors import Unauthorized
from gateway.http.deps import GatewayDeps
from gateway.lifecycle.deployer import Outcome
from gateway.lifecycle.errors import ModelLoadFailed, NothingToDo, UnknownModel
from gateway.settings import Settings
from rtinfer.procs import free_port

MODEL = "fraud_xgb"
ADMIN = {"X-API-Key": "admin"}
AT = datetime(2026, 11, 23, 18, 0, tzinfo=timezone.utc)


@dataclass
class FakeDeployer:
    """Answers each action with an outcome, or raises ``error``; records the calls."""

    managed_models: tuple[str, ...] = (MODEL, "fraud_nn")
    error: Exception | None = None
    history_error: Exception | None = None
    entries: list[HistoryEntry] = field(default_factory=list)
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def _answer(self, action: str, version: int, *call: Any) -> Outcome:
        self.calls.append(call)
        if self.error is not None:
            raise self.error
        return Outcome(MODEL, version, action, 12, "1", 1_800_000_000.0, {"load": 812.5})

    async def promote(
        self, model: str, version: int | None = None, *, trigger: str, actor: str | None = None
    ) -> Outcome:
        return self._answer("promoted", version or 2, "promote", model, version, trigger, actor)

    async def canary(
        self, model: str, version: int, traffic_pct: float, *, trigger: str, actor: str | None
    ) -> Outcome:
        return self._answer(
            "canary", version, "canary", model, version, traffic_pct, trigger, actor
        )

    async def rollback(self, model: str, *, trigger: str, actor: str | None = None) -> Outcome:
        return self._answer("rolled_back", 1, "rollback", model, trigger, actor)

    async def history(self, model: str, limit: int = 20) -> list[HistoryEntry]:
        self.calls.append(("history", model, limit))
        if self.history_error is not None:
            raise self.history_error
        return self.entries[:limit]


class FakeCatalog:
    def __init__(self, *deployments: Deployment) -> None:
        self.loaded = True
        self.reloads = 0
        self._snapshot = CatalogSnapshot.build(deployments, 1_700_000_000.0)

    def snapshot(self) -> CatalogSnapshot:
        return self._snapshot

    def get(self, name: str) -> Any:
        return self._snapshot.get(name)

    async def reload(self) -> None:
        self.reloads += 1


async def authenticate(request: Request) -> object:
    key = request.headers.get("X-API-Key")
    if key is None:
        raise Unauthorized("an API key is required")
    return SimpleNamespace(key_id=f"k-{key}", is_admin=key == "admin")


def deployment(model: str, dep_id: int) -> Deployment:
    return Deployment(dep_id, model, "1", f"{model}_pipeline", 100.0, deployed_at=AT)


@pytest.fixture()
def deployer() -> FakeDeployer:
    return FakeDeployer()


@pytest.fixture()
def catalog() -> FakeCatalog:
    return FakeCatalog(deployment(MODEL, 1), deployment("fraud_blend", 2))


@pytest.fixture()
def client(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    deployer: FakeDeployer,
    catalog: FakeCatalog,
) -> Iterator[TestClient]:
    @asynccontextmanager
    async def serving_core(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        yield SimpleNamespace(triton=None, pool=None, catalog=catalog, service=None)

    monkeypatch.setattr(gateway.http.app, "open_serving_core", serving_core)
    app = gateway.http.app.create_app(
        Settings(state_dir=tmp_path),
        GatewayDeps(authenticate=authenticate, deployer=deployer),  # type: ignore[arg-type]
    )
    with TestClient(app) as test_client:
        yield test_client


def error_of(response: Any) -> tuple[int, str, str]:
    err = response.json()["error"]
    return response.status_code, err["code"], err["message"]


def test_promote_answers_the_outcome_and_reloads_the_catalog(
    client: TestClient, deployer: FakeDeployer, catalog: FakeCatalog
) -> None:
    response = client.post(f"/models/{MODEL}/promote", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "model": MODEL,
        "version": 2,
        "action": "promoted",
        "deployment_id": 12,
        "previous_version": "1",
        "drain_until": 1_800_000_000.0,
        "timings_ms": {"load": 812.5},
    }
    response = client.post(f"/models/{MODEL}/promote", headers=ADMIN, json={"version": 3})
    assert response.json()["version"] == 3
    assert deployer.calls == [
        ("promote", MODEL, None, "admin", "k-admin"),
        ("promote", MODEL, 3, "admin", "k-admin"),
    ]
    assert catalog.reloads == 2


def test_canary_and_rollback_call_the_deployer(client: TestClient, deployer: FakeDeployer) -> None:
    response = client.post(
        f"/models/{MODEL}/canary", headers=ADMIN, json={"version": 2, "traffic_pct": 12.5}
    )
    assert (response.status_code, response.json()["action"]) == (200, "canary")
    response = client.post(f"/models/{MODEL}/rollback", headers=ADMIN)
    assert (response.status_code, response.json()["action"]) == (200, "rolled_back")
    assert deployer.calls == [
        ("canary", MODEL, 2, 12.5, "admin", "k-admin"),
        ("rollback", MODEL, "admin", "k-admin"),
    ]


@pytest.mark.parametrize(
    "path", ["promote", "rollback", "canary"], ids=["promote", "rollback", "canary"]
)
def test_a_non_admin_key_gets_403_and_no_key_401(
    client: TestClient, deployer: FakeDeployer, path: str
) -> None:
    body = {"version": 2, "traffic_pct": 10}
    status, code, message = error_of(
        client.post(f"/models/{MODEL}/{path}", headers={"X-API-Key": "user"}, json=body)
    )
    assert (status, code) == (403, "admin_required")
    assert "k-user is not an admin" in message
    assert error_of(client.post(f"/models/{MODEL}/{path}", json=body))[:2] == (401, "unauthorized")
    assert deployer.calls == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"version": 2, "traffic_pct": 0}, "traffic_pct"),
        ({"version": 2, "traffic_pct": 100}, "traffic_pct"),
        ({"version": 2, "traffic_pct": "10"}, "traffic_pct"),
        ({"traffic_pct": 10}, "version"),
        ({"version": 0, "traffic_pct": 10}, "version"),
        ({"version": 2.5, "traffic_pct": 10}, "version"),
        ({"version": 2, "traffic_pct": 10, "mode": "shadow"}, "mode"),
    ],
)
def test_invalid_canary_body_is_422_naming_the_field(
    client: TestClient, deployer: FakeDeployer, body: dict[str, Any], field: str
) -> None:
    status, code, message = error_of(
        client.post(f"/models/{MODEL}/canary", headers=ADMIN, json=body)
    )
    assert (status, code) == (422, "invalid_request")
    assert message.startswith(field), message
    assert deployer.calls == []


def test_invalid_promote_body_and_model_name_are_422(client: TestClient) -> None:
    for body in ({"version": "2"}, {"version": -1}, [2]):
        response = client.post(f"/models/{MODEL}/promote", headers=ADMIN, json=body)
        assert error_of(response)[:2] == (422, "invalid_request"), body
    status, _, message = error_of(client.post("/models/fraud%20xgb/rollback", headers=ADMIN))
    assert status == 422 and "model_name" in message


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (UnknownModel("model 'x' is not managed by the lifecycle"), 404, "model_not_managed"),
        (NothingToDo("fraud_xgb has no canary to promote; name a version"), 409, "nothing_to_do"),
        (ModelLoadFailed("fraud_xgb version 2: model.onnx: protobuf parsing failed"), 502, None),
        (psycopg.OperationalError("connection refused"), 503, "catalog_unavailable"),
    ],
)
def test_deployer_errors_become_typed_error_responses(
    client: TestClient, deployer: FakeDeployer, error: Exception, status: int, code: str | None
) -> None:
    deployer.error = error
    got_status, got_code, message = error_of(client.post(f"/models/{MODEL}/promote", headers=ADMIN))
    assert (got_status, got_code) == (status, code or getattr(error, "code", None))
    assert str(error) in message


def test_model_info_shows_the_latest_history_with_a_failed_deploy(
    client: TestClient, deployer: FakeDeployer
) -> None:
    failed = {"version": 2, "step": "smoke", "error": "golden example 3", "trigger": "watcher"}
    deployer.entries = [
        HistoryEntry(i, None, MODEL, "deploy_failed" if i == 11 else "promoted", failed, AT)
        for i in range(11, -1, -1)
    ]
    response = client.get(f"/models/{MODEL}", headers=ADMIN)
    assert response.status_code == 200, response.text
    history = response.json()["history"]
    assert len(history) == 10
    assert history[0] == {
        "id": 11,
        "deployment_id": None,
        "model_name": MODEL,
        "action": "deploy_failed",
        "detail": failed,
        "at": "2026-11-23T18:00:00Z",
    }
    assert ("history", MODEL, 10) in deployer.calls


def test_model_info_without_history_still_answers(
    client: TestClient, deployer: FakeDeployer
) -> None:
    deployer.history_error = psycopg.OperationalError("connection refused")
    response = client.get(f"/models/{MODEL}", headers=ADMIN)
    assert response.status_code == 200
    assert response.json()["history"] is None
    deployer.history_error = None
    response = client.get("/models/fraud_blend", headers=ADMIN)  # not managed
    assert (response.status_code, response.json()["history"]) == (200, None)
    assert client.get("/models", headers=ADMIN).json()["models"][0]["history"] is None


def test_openapi_documents_the_lifecycle_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for action in ("promote", "canary", "rollback"):
        op = spec["paths"][f"/models/{{model_name}}/{action}"]["post"]
        ok = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": "#/components/schemas/DeployOutcome"}
        assert {"403", "409", "422", "502"} <= set(op["responses"])
    assert "history" in spec["components"]["schemas"]["ModelInfo"]["properties"]


def test_without_an_injected_deployer_the_gateway_builds_one_and_maps_an_unreachable_catalog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, catalog: FakeCatalog
) -> None:
    @asynccontextmanager
    async def serving_core(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        yield SimpleNamespace(triton=None, pool=None, catalog=catalog, service=None)

    monkeypatch.setattr(gateway.http.app, "open_serving_core", serving_core)
    settings = Settings(state_dir=tmp_path)
    settings.gateway.postgres_dsn = SecretStr(f"host=127.0.0.1 port={free_port()} dbname=x")
    settings.gateway.postgres_connect_timeout_s = 0.3
    app = gateway.http.app.create_app(settings, GatewayDeps(authenticate=authenticate))
    with TestClient(app) as client:
        response = client.get(f"/models/{MODEL}", headers=ADMIN)
        assert (response.status_code, response.json()["history"]) == (200, None)
        assert error_of(client.post(f"/models/{MODEL}/rollback", headers=ADMIN))[:2] == (
            503,
            "catalog_unavailable",
        )
