"""The deployer service's webhook door (signed by MLflow's own code) and the download layout."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow.artifacts
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from rollout_fakes import SECRET, FakeDeployer, FakeRegistry, FakeStore, listing, mlflow_delivery

from gateway.lifecycle.config import LifecycleSettings
from gateway.lifecycle.mlflow_hooks import sign
from gateway.lifecycle.mlflow_registry import MlflowRegistry, VersionInfo
from gateway.lifecycle.registry_sync import RegistrySync, SyncMetrics
from gateway.lifecycle.service import create_deployer_app
from gateway.settings import Settings


@pytest.fixture
def parts() -> tuple[FakeStore, FakeDeployer]:
    return FakeStore(), FakeDeployer()


@pytest.fixture
def client(parts: tuple[FakeStore, FakeDeployer]) -> Iterator[TestClient]:
    store, deployer = parts
    lc = LifecycleSettings(
        managed_models=("fraud_xgb",), webhook_secret=SecretStr(SECRET), reconcile_interval_s=3600
    )
    settings = Settings(lifecycle=lc)
    registry = CollectorRegistry()
    mlflow = FakeRegistry(listing("fraud_xgb", [1, 2]))
    mlflow.listed = False  # only the webhook deploys here, not the reconcile loop
    sync = RegistrySync(
        lc,
        deployer,
        store,  # type: ignore[arg-type]
        mlflow,
        SyncMetrics(registry),
    )
    app = create_deployer_app(settings, deployer, sync, metrics_registry=registry)  # type: ignore[arg-type]
    with TestClient(app) as test_client:
        yield test_client


CREATED = {"name": "fraud_xgb", "version": "2", "source": "s", "run_id": "r", "tags": {}}


def _post(client: TestClient, headers: dict[str, str], body: bytes) -> object:
    return client.post("/hooks/mlflow", content=body, headers=headers)


def test_a_signed_delivery_is_accepted_deployed_and_a_redelivery_is_a_duplicate(
    client: TestClient, parts: tuple[FakeStore, FakeDeployer], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, deployer = parts
    headers, body = mlflow_delivery(monkeypatch, "model_version.created", CREATED)
    first = client.post("/hooks/mlflow", content=body, headers=headers)
    assert first.status_code == 202, first.text
    assert first.json()["status"] == "accepted"
    again = client.post("/hooks/mlflow", content=body, headers=headers)
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    deadline = time.monotonic() + 5
    while not store.rows or store.rows[-1]["outcome"] == "pending":
        assert time.monotonic() < deadline, store.rows
        time.sleep(0.01)
    assert [(r.model, r.version, r.mode) for r in deployer.requests] == [("fraud_xgb", 2, "shadow")]
    metrics = client.get("/metrics").text
    assert 'rtinfer_deployer_webhook_deliveries_total{outcome="accepted"} 1.0' in metrics
    assert 'rtinfer_deployer_webhook_deliveries_total{outcome="duplicate"} 1.0' in metrics


def test_forged_and_stale_deliveries_get_401(
    client: TestClient, parts: tuple[FakeStore, FakeDeployer], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, deployer = parts
    headers, body = mlflow_delivery(monkeypatch, "model_version.created", CREATED, secret="wrong")
    forged = client.post("/hooks/mlflow", content=body, headers=headers)
    assert forged.status_code == 401
    assert forged.json()["error"]["code"] == "webhook_rejected"
    headers, body = mlflow_delivery(monkeypatch, "model_version.created", CREATED)
    headers["X-MLflow-Timestamp"] = str(int(time.time()) - 3600)
    stale = client.post("/hooks/mlflow", content=body, headers=headers)
    assert stale.status_code == 401
    # re-signed with the old timestamp: the signature is fine, the age is not
    headers["X-MLflow-Signature"] = sign(
        SECRET, headers["X-MLflow-Delivery-Id"], headers["X-MLflow-Timestamp"], body
    )
    stale = client.post("/hooks/mlflow", content=body, headers=headers)
    assert stale.status_code == 401 and "stale" in stale.json()["error"]["message"]
    assert store.deliveries == set() and deployer.requests == []
    assert 'outcome="rejected"} 3.0' in client.get("/metrics").text


def test_events_not_acted_on_are_answered_ignored(
    client: TestClient, parts: tuple[FakeStore, FakeDeployer], monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = {"name": "fraud_xgb", "version": "2", "key": "k", "value": "v"}
    headers, body = mlflow_delivery(monkeypatch, "model_version_tag.set", payload)
    answer = client.post("/hooks/mlflow", content=body, headers=headers)
    assert (answer.status_code, answer.json()["status"]) == (200, "ignored")
    assert parts[1].requests == []


def test_health_endpoints(client: TestClient) -> None:
    assert client.get("/livez").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["postgres"] == "ok"


def test_a_download_is_laid_out_as_a_version_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifacts = tmp_path / "artifacts" / "model"
    artifacts.mkdir(parents=True)
    for name in ("model.onnx", "metadata.json", "feature_spec.json", "training_stats.json"):
        (artifacts / name).write_text(name)
    (artifacts / "MLmodel").write_text("flavors: {}")
    (artifacts / "notes.txt").write_text("not a version file")
    calls: list[dict[str, object]] = []

    def fake_download(**kwargs: object) -> str:
        calls.append(kwargs)
        dst = Path(str(kwargs["dst_path"])) / "model"
        shutil.copytree(artifacts, dst)
        return str(dst)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", fake_download)
    info = VersionInfo("fraud_xgb", 3, "mlflow-artifacts:/1/run/artifacts/model", "run")
    out = MlflowRegistry("http://127.0.0.1:1").download(info, tmp_path / "dl")
    assert out == tmp_path / "dl" / "3"
    assert sorted(p.name for p in out.iterdir()) == [
        "feature_spec.json",
        "metadata.json",
        "model.onnx",
        "training_stats.json",
    ]
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["3"]
    assert calls[0]["artifact_uri"] == info.source


@pytest.mark.parametrize("secret", [None, "", "short-secret"])
def test_the_deployer_refuses_to_start_without_a_real_webhook_secret(secret: str | None) -> None:
    lc = LifecycleSettings(
        managed_models=("fraud_xgb",),
        webhook_secret=SecretStr(secret) if secret is not None else None,
    )
    store, deployer = FakeStore(), FakeDeployer()
    registry = CollectorRegistry()
    sync = RegistrySync(lc, deployer, store, FakeRegistry(), SyncMetrics(registry))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="webhook_secret must be set"):
        create_deployer_app(Settings(lifecycle=lc), deployer, sync, metrics_registry=registry)  # type: ignore[arg-type]
    assert LifecycleSettings().webhook_secret is None  # no secret ships in the code
