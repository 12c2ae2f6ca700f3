"""Pure rules of the swap procedure: which arm is production, when a request changes nothing."""

from __future__ import annotations

from gateway.catalog.swaps import Row, arms, prod
from gateway.lifecycle.deployer import _serves_as


def _row(dep_id: int, version: str, pct: float, shadow: bool = False) -> Row:
    return Row(dep_id, version, f"fraud_xgb_pipeline__v{version}", pct, shadow, [], {}, 100.0)


def test_prod_is_the_largest_arm_and_the_oldest_on_a_tie() -> None:
    rows = [_row(1, "1", 50), _row(2, "2", 50), _row(3, "3", 0, shadow=True)]
    assert prod(rows) == rows[0]
    assert prod([_row(1, "1", 10), _row(2, "2", 90)]) == _row(2, "2", 90)
    assert prod([_row(3, "3", 100, shadow=True)]) is None
    assert arms(rows) == rows[:2]


def test_a_request_for_the_current_state_changes_nothing() -> None:
    alone = [_row(1, "1", 100)]
    assert _serves_as(alone, 1, "promote", 100)
    assert not _serves_as(alone, 2, "promote", 100)
    split = [_row(1, "1", 90), _row(2, "2", 10)]
    # version 1 still shares traffic: promoting it retires the canary
    assert not _serves_as(split, 1, "promote", 100)
    assert _serves_as(split, 2, "canary", 10)
    assert not _serves_as(split, 2, "canary", 25)  # a new share is a change
    assert not _serves_as(split, 2, "shadow", 100)
    assert _serves_as([*alone, _row(3, "3", 0, shadow=True)], 3, "shadow", 50)
