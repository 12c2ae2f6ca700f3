"""``rtinfer models promote|canary|rollback|deploy|history`` with a fake deployer in place of
the running stack's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import gateway.lifecycle.deployer
from gateway.catalog.swaps import HistoryEntry
from gateway.lifecycle.deployer import DeployRequest, Outcome
from gateway.lifecycle.errors import NothingToDo
from rtinfer import stack as stack_mod
from rtinfer.cli import app

MODEL = "fraud_xgb"


@dataclass
class FakeDeployer:
    error: Exception | None = None
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    #: the settings each deployer was opened with
    seen: list[Any] = field(default_factory=list)

    def _outcome(self, action: str, version: int, *call: Any) -> Outcome:
        self.calls.append(call)
        if self.error is not None:
            raise self.error
        return Outcome(MODEL, version, action, 5, "1", None, {"catalog": 3.0})

    async def deploy(self, req: DeployRequest) -> Outcome:
        return self._outcome("canary", req.version, "deploy", req)

    async def promote(
        self, model: str, version: int | None, *, trigger: str, actor: Any
    ) -> Outcome:
        return self._outcome("promoted", version or 2, "promote", model, version, trigger)

    async def canary(
        self, model: str, version: int, traffic_pct: float, *, trigger: str, actor: Any
    ) -> Outcome:
        return self._outcome("canary", version, "canary", model, version, traffic_pct, trigger)

    async def rollback(self, model: str, *, trigger: str, actor: Any) -> Outcome:
        return self._outcome("rolled_back", 1, "rollback", model, trigger)

    async def history(self, model: str, limit: int = 20) -> list[HistoryEntry]:
        self.calls.append(("history", model, limit))
        return []

    async def wait_settled(self, timeout_s: float | None = None) -> None:
        self.calls.append(("settled",))


@pytest.fixture()
def deployer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeDeployer:
    fake = FakeDeployer()

    @asynccontextmanager
    async def open_deployer(settings: Any, **kwargs: Any) -> AsyncIterator[FakeDeployer]:
        fake.seen.append(settings)
        yield fake

    state = stack_mod.StackState(
        model_repository=str(tmp_path),
        target="cpu",
        models=[],
        redis=stack_mod.ServiceState(pid=1, port=56379, log=""),
        triton=stack_mod.ServiceState(pid=1, port=58000, log=""),
        triton_grpc_port=58001,
        triton_metrics_port=58002,
        postgres=stack_mod.ServiceState(pid=1, port=55432, log=""),
    )
    monkeypatch.setattr(gateway.lifecycle.deployer, "open_deployer", open_deployer)
    monkeypatch.setattr(stack_mod, "require_running", lambda settings: state)
    return fake


def run(*args: str) -> Any:
    return CliRunner().invoke(app, ["models", *args])


def test_promote_canary_rollback_print_the_outcome_after_the_drain(
    deployer: FakeDeployer, tmp_path: Path
) -> None:
    result = run("promote", MODEL, "--version", "3")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["action"] == "promoted"
    assert run("canary", MODEL, "--version", "2", "--traffic-pct", "15").exit_code == 0
    assert run("rollback", MODEL).exit_code == 0
    assert deployer.calls == [
        ("promote", MODEL, 3, "cli"),
        ("settled",),
        ("canary", MODEL, 2, 15.0, "cli"),
        ("settled",),
        ("rollback", MODEL, "cli"),
        ("settled",),
    ]
    settings = deployer.seen[0]
    assert settings.postgres.port == 55432
    assert settings.gateway.triton_grpc_url == "127.0.0.1:58001"
    assert settings.triton.model_repository == tmp_path


def test_deploy_sends_the_request(deployer: FakeDeployer, tmp_path: Path) -> None:
    result = run("deploy", MODEL, "--version", "4", "--source", str(tmp_path), "--mode", "canary")
    assert result.exit_code == 0, result.output
    (_, req), _ = deployer.calls
    assert (req.model, req.version, req.mode, req.source, req.trigger) == (
        MODEL,
        4,
        "canary",
        tmp_path.resolve(),
        "cli",
    )
    result = run("deploy", MODEL, "--version", "4", "--mode", "blue-green")
    assert result.exit_code == 1 and "--mode must be" in result.output


def test_lifecycle_error_is_one_line_and_exit_1(deployer: FakeDeployer) -> None:
    deployer.error = NothingToDo(f"{MODEL} has no canary to promote; name a version")
    result = run("promote", MODEL)
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"error: nothing_to_do: {MODEL} has no canary to promote; name a version"
    )


def test_history_prints_entries_without_waiting(deployer: FakeDeployer) -> None:
    result = run("history", MODEL, "--limit", "5")
    assert (result.exit_code, json.loads(result.stdout)) == (0, [])
    assert deployer.calls == [("history", MODEL, 5)]
