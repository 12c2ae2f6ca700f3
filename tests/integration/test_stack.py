"""The CLI's view of the running stack."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
from mlflow import MlflowClient

from gateway.lifecycle.mlflow_hooks import (
    DELIVERY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
)
from gateway.secret_files import read_or_create_secret
from gateway.settings import Settings
from rtinfer import stack, stack_status
from rtinfer.stack import WEBHOOK_SECRET_FILE

pytestmark = pytest.mark.integration


def test_status_reports_every_model_ready(
    running_stack: stack.StackState, stack_settings: Settings
) -> None:
    status = stack_status.status(stack_settings)
    assert status["running"] is True
    assert status["redis"]["alive"] and status["redis"]["ping"]  # type: ignore[index]
    triton = status["triton"]
    assert triton["alive"] and triton["ready"]  # type: ignore[index]
    assert all(triton["models"].values())  # type: ignore[index]
    assert set(triton["models"]) == set(running_stack.models)  # type: ignore[index]
    for name, svc in running_stack.services().items():
        assert (stack_settings.state_dir / f"{name}.pid").read_text().strip() == str(svc.pid)
    assert {"redis", "postgres", "kafka", "mlflow", "triton", "gateway"} <= set(
        running_stack.services()
    )
    assert status["gateway"]["readyz"]["ready"] is True  # type: ignore[index]
    mlflow = status["mlflow"]
    assert mlflow["alive"] and mlflow["healthy"], mlflow  # type: ignore[index]
    assert mlflow["tracking_uri"] == running_stack.mlflow_uri  # type: ignore[index]


def test_status_reports_catalog_and_topics(
    running_stack: stack.StackState, stack_settings: Settings
) -> None:
    status = stack_status.status(stack_settings)
    postgres, kafka = status["postgres"], status["kafka"]
    assert postgres["alive"] and postgres["active_deployments"] == 3, postgres  # type: ignore[index]
    assert kafka["alive"], kafka  # type: ignore[index]
    assert kafka["topics"] == {  # type: ignore[index]
        "inference-requests": 6,
        "inference-requests-dlq": 1,
        "prediction-labels": 3,
        "predictions": 6,
        "predictions-dlq": 1,
        "predictions-shadow": 3,
    }


def test_second_stack_up_is_refused(
    running_stack: stack.StackState, stack_settings: Settings
) -> None:
    with pytest.raises(stack.StackError, match="already running"):
        stack.up(stack_settings)


def test_deployer_runs_and_mlflow_delivers_signed_events_to_it(
    running_stack: stack.StackState, stack_settings: Settings
) -> None:
    assert running_stack.deployer is not None and running_stack.mlflow_uri is not None
    deployer = stack_status.status(stack_settings)["deployer"]
    assert deployer["alive"] and deployer["readyz"]["status"] == "ready", deployer  # type: ignore[index]
    client = MlflowClient(running_stack.mlflow_uri, running_stack.mlflow_uri)
    url = f"http://{stack_settings.lifecycle.deployer_host}:{running_stack.deployer.port}"
    (hook,) = [h for h in client.list_webhooks() if h.url == f"{url}/hooks/mlflow"]
    assert {str(e) for e in hook.events} >= {
        "model_version.created",
        "model_version_alias.created",
        "model_version_alias.deleted",
    }
    # MLflow signs its example delivery with the webhook's secret: the deployer accepts it
    result = client.test_webhook(hook.webhook_id, "model_version.created")
    assert (result.success, result.response_status) == (True, 202), result
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert 'rtinfer_deployer_webhook_deliveries_total{outcome="accepted"}' in metrics


def test_deployer_refuses_forged_and_stale_deliveries_and_dedupes_by_delivery_id(
    running_stack: stack.StackState, stack_settings: Settings
) -> None:
    assert running_stack.deployer is not None
    url = (
        f"http://{stack_settings.lifecycle.deployer_host}:{running_stack.deployer.port}"
        "/hooks/mlflow"
    )
    # no secret configured: `stack up` generated one into the state dir (and MLflow has it)
    assert stack_settings.lifecycle.webhook_secret is None
    secret = read_or_create_secret(stack_settings.state_dir / WEBHOOK_SECRET_FILE)
    assert len(secret) >= 32
    # an alias event of a model the lifecycle does not manage: accepted, deploys nothing
    body = json.dumps(
        {
            "entity": "model_version_alias",
            "action": "created",
            "timestamp": "2026-11-23T00:00:00Z",
            "data": {"name": "not_managed", "alias": "champion", "version": "1"},
        }
    ).encode()

    def post(delivery: str, timestamp: int, signature: str) -> httpx.Response:
        headers = {
            DELIVERY_ID_HEADER: delivery,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: signature,
            "Content-Type": "application/json",
        }
        return httpx.post(url, content=body, headers=headers, timeout=10)

    now = int(time.time())
    delivery = str(uuid.uuid4())
    forged = post(delivery, now, sign("not-the-secret", delivery, str(now), body))
    assert forged.status_code == 401 and forged.json()["error"]["code"] == "webhook_rejected"
    stale_at = now - int(stack_settings.lifecycle.webhook_max_skew_s) - 60
    stale = post(delivery, stale_at, sign(secret, delivery, str(stale_at), body))
    assert stale.status_code == 401, stale.text
    first = post(delivery, now, sign(secret, delivery, str(now), body))
    assert first.status_code in (200, 202), first.text
    again = post(delivery, now, sign(secret, delivery, str(now), body))
    assert again.status_code == 200 and again.json()["status"] == "duplicate", again.text
