"""Shared pieces of the MLflow rollout unit tests: deliveries signed by MLflow's own delivery
code, and fakes of the registry, the applied record (with ``sync_store``'s claim rules) and
the deployer."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities.webhook import Webhook, WebhookEvent
from mlflow.webhooks import delivery

from gateway.catalog.rollout_store import PENDING, AppliedState
from gateway.lifecycle.deployer import DeployRequest, Outcome
from gateway.lifecycle.errors import NothingToDo, SmokeTestFailed
from gateway.lifecycle.mlflow_hooks import RegistryEvent
from gateway.lifecycle.mlflow_registry import ModelListing, VersionInfo

SECRET = "rtinfer-test-webhook-secret"


class _Captured:
    status_code = 200
    text = ""


class CapturingSession:
    """Stands in for the requests session MLflow posts with; keeps what it was given."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, str], bytes]] = []

    def post(self, url: str, *, data: bytes, headers: dict[str, str], timeout: float) -> Any:
        self.sent.append((dict(headers), data))
        return _Captured()


def mlflow_delivery(
    monkeypatch: pytest.MonkeyPatch,
    event: str,
    payload: Mapping[str, Any],
    secret: str | None = SECRET,
) -> tuple[dict[str, str], bytes]:
    """Headers and body of one delivery built and signed by MLflow's ``_send_webhook_request``."""
    monkeypatch.setattr(delivery, "_validate_webhook_url", lambda url: None)
    entity, action = event.split(".")
    hook = Webhook(
        webhook_id="wh-1",
        name="rtinfer-deployer",
        url="https://deployer.example/hooks/mlflow",
        events=[WebhookEvent(entity, action)],
        creation_timestamp=0,
        last_updated_timestamp=0,
        secret=secret,
    )
    session = CapturingSession()
    delivery._send_webhook_request(hook, payload, WebhookEvent(entity, action), session)
    (sent,) = session.sent
    return sent


def run_async(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """A plain test running ``test`` in a fresh event loop."""

    @functools.wraps(test)
    def wrapper() -> None:
        asyncio.run(test())

    return wrapper


def listing(model: str, versions: list[int], **aliases: int) -> ModelListing:
    infos = {
        v: VersionInfo(model, v, f"mlflow-artifacts:/{model}/{v}", f"run{v}") for v in versions
    }
    return ModelListing(model, infos, aliases)


class FakeStore:
    """``SyncStore`` in memory, with its claim rules."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.deliveries: set[str] = set()

    async def ping(self) -> None:
        return None

    async def record_delivery(self, event: RegistryEvent) -> bool:
        if event.delivery_id in self.deliveries:
            return False
        self.deliveries.add(event.delivery_id)
        return True

    async def applied_state(self, models: Any) -> AppliedState:
        created: dict[str, set[int]] = {}
        aliases: dict[tuple[str, str], int | None] = {}
        for row in self.rows:
            if row["model"] not in models:
                continue
            if row["kind"] == "created":
                created.setdefault(row["model"], set()).add(row["version"])
            else:
                aliases[(row["model"], row["kind"].removeprefix("alias:"))] = row["version"]
        return AppliedState({m: frozenset(v) for m, v in created.items()}, aliases)

    async def newest_created(self, model: str) -> int | None:
        versions = [
            r["version"] for r in self.rows if (r["model"], r["kind"]) == (model, "created")
        ]
        return max(versions, default=None)

    async def claim(
        self,
        model: str,
        kind: str,
        version: int | None,
        *,
        trigger: str,
        outcome: str = PENDING,
        detail: Any = None,
    ) -> int | None:
        await asyncio.sleep(0)  # a round trip: let a racing claimer interleave
        same = [r for r in self.rows if (r["model"], r["kind"]) == (model, kind)]
        if kind == "created":
            if any(r["version"] == version for r in same):
                return None
        elif (same[-1]["version"] if same else None) == version:
            return None
        self.rows.append(
            {
                "id": len(self.rows) + 1,
                "model": model,
                "kind": kind,
                "version": version,
                "outcome": outcome,
                "trigger": trigger,
                "detail": dict(detail or {}),
            }
        )
        return len(self.rows)

    async def finish(self, claim_id: int, outcome: str, detail: Any) -> None:
        row = self.rows[claim_id - 1]
        row["outcome"] = outcome
        row["detail"].update(detail)

    def outcomes(self) -> list[tuple[str, str, int | None, str]]:
        return [(r["model"], r["kind"], r["version"], r["outcome"]) for r in self.rows]


class FakeRegistry:
    def __init__(self, *listings: ModelListing) -> None:
        self.listings = {listing.model: listing for listing in listings}
        #: False: listings come back empty (the reconcile loop finds nothing), versions resolve
        self.listed = True

    def listing(self, model: str) -> ModelListing:
        if not self.listed:
            return ModelListing(model)
        return self.listings.get(model, ModelListing(model))

    def version(self, model: str, version: int) -> VersionInfo:
        return self.listings[model].versions[version]

    def download(self, info: VersionInfo, dst: Path) -> Path:
        out = dst / str(info.version)
        out.mkdir()
        (out / "metadata.json").write_text(f'{{"source": "{info.source}"}}')
        return out


ACTIONS = {"promote": "promoted", "canary": "canary", "shadow": "shadow"}


class FakeDeployer:
    def __init__(
        self,
        fail_versions: frozenset[int] = frozenset(),
        nothing_to_do: frozenset[int] = frozenset(),
    ) -> None:
        self.requests: list[DeployRequest] = []
        self.source_files: list[list[str]] = []
        self.fail_versions = fail_versions
        #: versions that already serve production (a shadow of them has nothing to do)
        self.nothing_to_do = nothing_to_do

    async def deploy(self, req: DeployRequest) -> Outcome:
        self.requests.append(req)
        assert req.source is not None
        self.source_files.append(sorted(p.name for p in req.source.iterdir()))
        await asyncio.sleep(0.01)
        if req.version in self.fail_versions:
            raise SmokeTestFailed(f"{req.model} version {req.version}: golden example 0 off")
        if req.version in self.nothing_to_do:
            raise NothingToDo(f"{req.model} version {req.version} already serves production")
        return Outcome(req.model, req.version, ACTIONS[req.mode], 42, "1", None, {})

    async def wait_settled(self, timeout_s: float | None = None) -> None:
        return None
