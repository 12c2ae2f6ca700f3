"""The MLflow rollout convention and the reconcile decisions, against a fake registry,
an in-memory applied record with the claim semantics of ``sync_store`` and a fake deployer."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from prometheus_client import CollectorRegistry
from rollout_fakes import FakeDeployer, FakeRegistry, FakeStore, listing, run_async

from gateway.catalog.rollout_store import AppliedState
from gateway.lifecycle.config import LifecycleSettings
from gateway.lifecycle.mlflow_hooks import RegistryEvent
from gateway.lifecycle.mlflow_registry import ModelListing
from gateway.lifecycle.registry_sync import RegistrySync, SyncMetrics
from gateway.lifecycle.rollout_plan import Pending, action_for, plan_reconcile

LC = LifecycleSettings(managed_models=("fraud_xgb", "fraud_nn"), canary_pct=10.0)


# --- the convention --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lc", "model", "alias", "tags", "mode", "pct"),
    [
        (LC, "fraud_xgb", None, {}, "shadow", 100.0),  # the default: mirrored, never served
        (LC, "fraud_xgb", None, {"rtinfer.shadow_sample_pct": "20"}, "shadow", 20.0),
        (LC.model_copy(update={"on_register": "promote"}), "fraud_xgb", None, {}, "promote", None),
        (LC.model_copy(update={"on_register": "canary"}), "fraud_xgb", None, {}, "canary", 10.0),
        (LC, "fraud_xgb", "champion", {"rtinfer.traffic_pct": "30"}, "promote", None),
        (LC, "fraud_xgb", "canary", {}, "canary", 10.0),
        (LC, "fraud_xgb", "canary", {"rtinfer.traffic_pct": "25"}, "canary", 25.0),
        (LC, "fraud_nn", "challenger", {}, "shadow", 100.0),
        (LC, "fraud_nn", "challenger", {"rtinfer.shadow_sample_pct": "5"}, "shadow", 5.0),
    ],
)
def test_aliases_and_new_versions_map_to_deploy_modes(
    lc: LifecycleSettings,
    model: str,
    alias: str | None,
    tags: dict[str, str],
    mode: str,
    pct: float | None,
) -> None:
    action = action_for(lc, model, 4, alias, tags)
    assert (action.mode, action.traffic_pct) == (mode, pct)
    assert action.kind == ("created" if alias is None else f"alias:{alias}")


@pytest.mark.parametrize(
    ("lc", "model", "alias", "tags", "reason"),
    [
        (LC, "fraud_context_lr", "champion", {}, "not a managed model"),
        (LC.model_copy(update={"on_register": "none"}), "fraud_xgb", None, {}, "on_register"),
        (LC, "fraud_xgb", "staging", {}, "no rollout role"),
        (LC, "fraud_xgb", "canary", {"rtinfer.traffic_pct": "100"}, "not a percentage"),
        (LC, "fraud_xgb", "canary", {"rtinfer.traffic_pct": "ten"}, "not a percentage"),
        (LC, "fraud_xgb", "challenger", {"rtinfer.shadow_sample_pct": "0"}, "not a percentage"),
    ],
)
def test_states_without_a_deploy_say_why(
    lc: LifecycleSettings, model: str, alias: str | None, tags: dict[str, str], reason: str
) -> None:
    action = action_for(lc, model, 4, alias, tags)
    assert action.mode is None
    assert reason in action.reason


# --- reconcile planning ----------------------------------------------------------------


def test_a_fresh_registry_rolls_out_the_newest_version_and_its_aliases() -> None:
    plan = plan_reconcile([listing("fraud_xgb", [1, 2, 3], canary=3, champion=2)], AppliedState())
    assert plan == [
        Pending("fraud_xgb", "created", 1, "superseded"),
        Pending("fraud_xgb", "created", 2, "superseded"),
        Pending("fraud_xgb", "created", 3),
        Pending("fraud_xgb", "alias:champion", 2),
        Pending("fraud_xgb", "alias:canary", 3),
    ]


def test_recorded_states_are_not_planned_again() -> None:
    applied = AppliedState({"fraud_xgb": frozenset({1, 2, 3})}, {("fraud_xgb", "champion"): 2})
    assert plan_reconcile([listing("fraud_xgb", [1, 2, 3], champion=2)], applied) == []


def test_a_moved_alias_and_a_vanished_alias_are_planned() -> None:
    applied = AppliedState(
        {"fraud_xgb": frozenset({1, 2, 3})},
        {("fraud_xgb", "champion"): 3, ("fraud_xgb", "canary"): 3},
    )
    # champion moved back to 2 (a rollback in the registry); canary was removed
    assert plan_reconcile([listing("fraud_xgb", [1, 2, 3], champion=2)], applied) == [
        Pending("fraud_xgb", "alias:champion", 2),
        Pending("fraud_xgb", "alias:canary", None, "alias_deleted"),
    ]


def test_a_version_older_than_one_applied_is_superseded() -> None:
    applied = AppliedState({"fraud_xgb": frozenset({5})})
    assert plan_reconcile([listing("fraud_xgb", [4, 5])], applied) == [
        Pending("fraud_xgb", "created", 4, "superseded")
    ]


# --- applying, with fakes --------------------------------------------------------------


def _sync(store: FakeStore, registry: FakeRegistry, deployer: FakeDeployer) -> RegistrySync:
    return RegistrySync(LC, deployer, store, registry, SyncMetrics(CollectorRegistry()))  # type: ignore[arg-type]


def _tagged(listing: ModelListing, version: int, **tags: str) -> ModelListing:
    info = dataclasses.replace(listing.versions[version], tags=tags)
    return dataclasses.replace(listing, versions={**listing.versions, version: info})


CREATED_2 = RegistryEvent("d-1", "model_version.created", "fraud_xgb", version=2)


@run_async
async def test_a_new_version_is_downloaded_and_shadowed_once() -> None:
    store, registry, deployer = (
        FakeStore(),
        FakeRegistry(listing("fraud_xgb", [1, 2])),
        FakeDeployer(),
    )
    store.rows.append(  # version 1 was handled before
        {"id": 1, "model": "fraud_xgb", "kind": "created", "version": 1, "outcome": "x",
         "trigger": "t", "detail": {}}
    )  # fmt: skip
    sync = _sync(store, registry, deployer)
    await sync.handle(CREATED_2)
    await sync.reconcile()
    await sync.handle(CREATED_2)
    assert [(r.model, r.version, r.mode, r.trigger) for r in deployer.requests] == [
        ("fraud_xgb", 2, "shadow", "mlflow-webhook")
    ]
    (req,) = deployer.requests
    assert req.detail["delivery_id"] == "d-1" and req.detail["mlflow_run_id"] == "run2"
    assert deployer.source_files == [["metadata.json"]]
    assert not req.source.exists()  # type: ignore[union-attr]  # the download is cleaned up
    assert store.outcomes()[-1] == ("fraud_xgb", "created", 2, "shadow")


@run_async
async def test_webhook_and_reconcile_racing_in_two_processes_deploy_once() -> None:
    store, registry = FakeStore(), FakeRegistry(listing("fraud_xgb", [1], champion=1))
    deployer = FakeDeployer()
    webhook_side, reconcile_side = (
        _sync(store, registry, deployer),
        _sync(store, registry, deployer),
    )
    alias = RegistryEvent(
        "d-2", "model_version_alias.created", "fraud_xgb", version=1, alias="champion"
    )
    await asyncio.gather(
        webhook_side.handle(RegistryEvent("d-1", "model_version.created", "fraud_xgb", version=1)),
        webhook_side.handle(alias),
        reconcile_side.reconcile(),
    )
    assert sorted((r.version, r.detail["registry_kind"]) for r in deployer.requests) == [
        (1, "alias:champion"),
        (1, "created"),
    ]


@run_async
async def test_a_failed_deploy_is_recorded_once_and_a_new_version_acts_again() -> None:
    store, registry = FakeStore(), FakeRegistry(listing("fraud_xgb", [3]))
    deployer = FakeDeployer(fail_versions=frozenset({3}))
    sync = _sync(store, registry, deployer)
    await sync.reconcile()
    await sync.reconcile()
    assert [r.version for r in deployer.requests] == [3]
    (row,) = store.rows
    assert row["outcome"] == "failed" and row["detail"]["code"] == "smoke_test_failed"
    assert "golden example" in row["detail"]["error"]
    registry.listings["fraud_xgb"] = listing("fraud_xgb", [3, 4])
    await sync.reconcile()
    assert [r.version for r in deployer.requests] == [3, 4]
    assert store.outcomes()[-1] == ("fraud_xgb", "created", 4, "shadow")


@run_async
async def test_canary_and_challenger_aliases_take_their_share_from_version_tags() -> None:
    tagged = _tagged(listing("fraud_nn", [1, 2, 3]), 2, **{"rtinfer.traffic_pct": "20"})
    tagged = _tagged(tagged, 3, **{"rtinfer.shadow_sample_pct": "50"})
    store = FakeStore()
    store.rows.extend(
        {"id": i, "model": "fraud_nn", "kind": "created", "version": i, "outcome": "promoted",
         "trigger": "t", "detail": {}}
        for i in (1, 2, 3)
    )  # fmt: skip
    registry = FakeRegistry(dataclasses.replace(tagged, aliases={"canary": 2, "challenger": 3}))
    deployer = FakeDeployer()
    await _sync(store, registry, deployer).reconcile()
    assert [(r.version, r.mode, r.traffic_pct) for r in deployer.requests] == [
        (2, "canary", 20.0),
        (3, "shadow", 50.0),
    ]


@run_async
async def test_an_alias_moved_back_acts_again_and_a_deleted_alias_only_records() -> None:
    store, deployer = FakeStore(), FakeDeployer()
    registry = FakeRegistry(listing("fraud_xgb", [1, 2], champion=2))
    sync = _sync(store, registry, deployer)
    await sync.reconcile()  # created 2 and champion 2
    registry.listings["fraud_xgb"] = listing("fraud_xgb", [1, 2], champion=1)
    await sync.reconcile()
    await sync.handle(
        RegistryEvent("d-9", "model_version_alias.deleted", "fraud_xgb", alias="champion")
    )
    assert [(r.version, r.detail["registry_kind"]) for r in deployer.requests] == [
        (2, "created"),
        (2, "alias:champion"),
        (1, "alias:champion"),
    ]
    assert store.outcomes()[-1] == ("fraud_xgb", "alias:champion", None, "alias_deleted")


@run_async
async def test_unmanaged_models_and_unknown_aliases_are_recorded_as_ignored() -> None:
    store, deployer = FakeStore(), FakeDeployer()
    registry = FakeRegistry(listing("fraud_context_lr", [1]), listing("fraud_xgb", [1]))
    sync = _sync(store, registry, deployer)
    await sync.handle(RegistryEvent("d-1", "model_version.created", "fraud_context_lr", version=1))
    await sync.handle(
        RegistryEvent("d-2", "model_version_alias.created", "fraud_xgb", version=1, alias="qa")
    )
    assert deployer.requests == []
    assert [(r["model"], r["kind"], r["outcome"]) for r in store.rows] == [
        ("fraud_context_lr", "created", "ignored"),
        ("fraud_xgb", "alias:qa", "ignored"),
    ]
    assert "not a managed model" in store.rows[0]["detail"]["reason"]


@run_async
async def test_a_registered_version_already_serving_production_is_unchanged() -> None:
    store, registry = FakeStore(), FakeRegistry(listing("fraud_xgb", [1]))
    deployer = FakeDeployer(nothing_to_do=frozenset({1}))
    sync = _sync(store, registry, deployer)
    await sync.reconcile()
    assert store.outcomes() == [("fraud_xgb", "created", 1, "unchanged")]
    assert "already serves" in store.rows[0]["detail"]["reason"]
