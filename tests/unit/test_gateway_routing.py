"""Canary traffic split: weights honoured over many users, sticky per user, shadows ignored."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.catalog.records import Deployment
from gateway.catalog.traffic import RoutingTable, sticky_bucket

MODEL = "fraud_xgb"
USERS = [f"u_{i:06d}" for i in range(10_000)]


def dep(dep_id: int, pct: float, *, shadow: bool = False, version: str | None = None) -> Deployment:
    return Deployment(
        deployment_id=dep_id,
        model_name=MODEL,
        model_version=version or str(dep_id),
        serving_endpoint=f"endpoint_{dep_id}",
        traffic_pct=pct,
        is_shadow=shadow,
    )


def shares(table: RoutingTable, users: list[str] = USERS) -> dict[int, float]:
    counts: Counter[int] = Counter()
    for user in users:
        route = table.choose(MODEL, user)
        assert route is not None
        counts[route.deployment.deployment_id] += 1
    return {dep_id: 100.0 * n / len(users) for dep_id, n in counts.items()}


@pytest.mark.parametrize(
    "weights",
    [(90.0, 10.0), (50.0, 50.0), (99.0, 1.0), (70.0, 20.0, 10.0)],
    ids=["90/10", "50/50", "99/1", "70/20/10"],
)
def test_split_follows_traffic_pct_within_2_points(weights: tuple[float, ...]) -> None:
    table = RoutingTable.build([dep(i + 1, w) for i, w in enumerate(weights)])
    measured = shares(table)
    for i, weight in enumerate(weights):
        assert measured.get(i + 1, 0.0) == pytest.approx(weight, abs=2.0), measured


def test_weights_are_relative_shares() -> None:
    # 100 + 25 (e.g. a canary added before prod was lowered): the canary gets 25/125 = 20%
    measured = shares(RoutingTable.build([dep(1, 100.0), dep(2, 25.0)]))
    assert measured[2] == pytest.approx(20.0, abs=2.0)


def test_100_0_sends_everyone_to_prod() -> None:
    table = RoutingTable.build([dep(1, 100.0), dep(2, 0.0)])
    assert shares(table) == {1: 100.0}
    assert table.role(dep(2, 0.0)) == "idle"


def test_same_user_always_gets_the_same_arm() -> None:
    deployments = [dep(1, 90.0), dep(2, 10.0)]
    first = RoutingTable.build(deployments)
    rebuilt = RoutingTable.build(list(reversed(deployments)))  # order of rows does not matter
    for user in USERS[:2000]:
        arm = first.choose(MODEL, user)
        assert arm is not None
        for table in (first, rebuilt, first):
            again = table.choose(MODEL, user)
            assert again is not None
            assert again.deployment.deployment_id == arm.deployment.deployment_id


def test_raising_the_canary_share_only_moves_users_to_the_canary() -> None:
    before = RoutingTable.build([dep(1, 90.0), dep(2, 10.0)])
    after = RoutingTable.build([dep(1, 80.0), dep(2, 20.0)])
    moved = 0
    for user in USERS:
        old, new = before.choose(MODEL, user), after.choose(MODEL, user)
        assert old is not None and new is not None
        if old.deployment.deployment_id == 2:
            assert new.deployment.deployment_id == 2, user
        moved += old.deployment.deployment_id != new.deployment.deployment_id
    assert moved == pytest.approx(1000, abs=200)


def test_prod_is_the_largest_arm_and_others_are_canaries() -> None:
    table = RoutingTable.build([dep(1, 20.0), dep(2, 70.0), dep(3, 10.0)])
    arms = {r.deployment.deployment_id: r.arm for r in table.routes}
    assert arms == {1: "canary", 2: "prod", 3: "canary"}
    tie = RoutingTable.build([dep(5, 50.0), dep(4, 50.0)])
    assert {r.deployment.deployment_id: r.arm for r in tie.routes} == {4: "prod", 5: "canary"}


def test_shadow_deployments_get_no_traffic() -> None:
    shadow = dep(2, 100.0, shadow=True)
    table = RoutingTable.build([dep(1, 100.0), shadow])
    assert shares(table, USERS[:2000]) == {1: 100.0}
    assert table.role(shadow) == "shadow"
    assert RoutingTable.build([shadow]).choose(MODEL, "u_000001") is None


def test_no_arm_receiving_traffic_routes_nowhere() -> None:
    assert RoutingTable.build([]).choose(MODEL, "u_000001") is None
    assert RoutingTable.build([dep(1, 0.0)]).choose(MODEL, "u_000001") is None


def test_bucket_is_stable_across_processes_and_per_model() -> None:
    # blake2b, not Python's randomized hash(): a user keeps its arm across restarts
    assert sticky_bucket("fraud_xgb", "u_000042") == pytest.approx(53.075694141747896, abs=1e-9)
    assert 0.0 <= sticky_bucket("fraud_nn", "u_000042") < 100.0
    assert sticky_bucket("fraud_nn", "u_000042") != sticky_bucket("fraud_xgb", "u_000042")
