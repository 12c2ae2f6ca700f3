"""The CLI's view of the running stack."""

from __future__ import annotations

import pytest

from rtinfer import stack
from rtinfer.settings import Settings

pytestmark = pytest.mark.integration


def test_status_reports_every_model_ready(
    running_stack: stack.StackState, stack_settings: Settings
) -> None:
    status = stack.status(stack_settings)
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
    status = stack.status(stack_settings)
    postgres, kafka = status["postgres"], status["kafka"]
    assert postgres["alive"] and postgres["active_deployments"] == 3, postgres  # type: ignore[index]
    assert kafka["alive"], kafka  # type: ignore[index]
    assert kafka["topics"] == {  # type: ignore[index]
        "inference-requests": 6,
        "inference-requests-dlq": 1,
        "predictions": 6,
        "predictions-shadow": 3,
    }


def test_second_stack_up_is_refused(
    running_stack: stack.StackState, stack_settings: Settings
) -> None:
    with pytest.raises(stack.StackError, match="already running"):
        stack.up(stack_settings)
