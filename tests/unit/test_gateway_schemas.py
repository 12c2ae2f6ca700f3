"""The prediction request contract: what is accepted, what is refused, and why (by field)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.errors import describe_validation_errors
from gateway.schemas import CONTEXT_FEATURES, PredictRequest, valid_request_id
from python_backend.contract import CONTEXT_FEATURES as ENSEMBLE_CONTEXT_FEATURES

IDS = {"user_id": "u_000042", "merchant_id": "m_00007"}


def parse(raw: str) -> PredictRequest:
    """As the route does: JSON text -> Python objects -> model."""
    return PredictRequest.model_validate(json.loads(raw))


def refused(body: dict[str, Any] | str) -> str:
    """The 422 message for ``body``."""
    with pytest.raises(ValidationError) as err:
        parse(body if isinstance(body, str) else json.dumps(body))
    return describe_validation_errors(err.value.errors())


def test_context_features_are_the_ensemble_input_order() -> None:
    assert CONTEXT_FEATURES == ENSEMBLE_CONTEXT_FEATURES


def test_minimal_request_sends_nan_for_every_context_feature() -> None:
    req = parse(json.dumps({"entity_ids": IDS}))
    assert req.context == {} and req.feature_overrides is None
    assert req.deadline_ms is None and req.request_id is None
    vec = req.context_vector()
    assert len(vec) == 10 and all(math.isnan(v) for v in vec)


def test_context_is_placed_in_tensor_order_and_overrides_replace_it() -> None:
    req = parse(
        json.dumps(
            {
                "entity_ids": IDS,
                "context": {"is_new_device": 1, "amount": 10},
                "feature_overrides": {"amount": 980.5, "hour_of_day": 3},
                "deadline_ms": 50,
                "request_id": "req-1.a_B",
            }
        )
    )
    vec = req.context_vector()
    assert vec[0] == 980.5 and vec[1] == 3.0 and vec[9] == 1.0
    assert all(math.isnan(v) for v in vec[2:9])
    assert req.context == {"is_new_device": 1.0, "amount": 10.0}  # as sent, for the log


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"context": {"amount": 1}}, "entity_ids: Field required"),
        ({"entity_ids": {"user_id": "u"}}, "entity_ids.merchant_id: Field required"),
        ({"entity_ids": {**IDS, "user_id": ""}}, "entity_ids.user_id"),
        ({"entity_ids": {**IDS, "user_id": "   "}}, "entity_ids.user_id: must not be blank"),
        ({"entity_ids": {**IDS, "merchant_id": "m" * 129}}, "entity_ids.merchant_id"),
        # 100 characters but 200 bytes: over the feature assembler's 128-byte limit
        ({"entity_ids": {**IDS, "user_id": "é" * 100}}, "at most 128 bytes"),
        (
            {"entity_ids": {**IDS, "user_id": 42}},
            "entity_ids.user_id: Input should be a valid string",
        ),
        ({"entity_ids": {**IDS, "tenant": "t"}}, "entity_ids.tenant: Extra inputs"),
        ({"entity_ids": IDS, "context": {"amout": 1}}, "context.amout: Input should be 'amount'"),
        (
            {"entity_ids": IDS, "context": {"amount": "12"}},
            "context.amount: Input should be a valid number",
        ),
        (
            {"entity_ids": IDS, "context": {"amount": True}},
            "context.amount: Input should be a valid number",
        ),
        ({"entity_ids": IDS, "context": {"amount": None}}, "context.amount"),
        (
            {"entity_ids": IDS, "context": {"amount": 1e39}},
            "context.amount: must be within the float32",
        ),
        ({"entity_ids": IDS, "context": [1, 2]}, "context: Input should be a valid dictionary"),
        (
            {"entity_ids": IDS, "feature_overrides": {"user_txn_count_24h": 3}},
            "not allowed: user_txn_count_24h",
        ),
        (
            {"entity_ids": IDS, "deadline_ms": 0},
            "deadline_ms: Input should be greater than or equal to 1",
        ),
        ({"entity_ids": IDS, "deadline_ms": 10_001}, "deadline_ms: Input should be less than"),
        ({"entity_ids": IDS, "deadline_ms": 50.5}, "deadline_ms: Input should be a valid integer"),
        ({"entity_ids": IDS, "request_id": "a b"}, "request_id: String should match pattern"),
        ({"entity_ids": IDS, "request_id": "r" * 65}, "request_id"),
        ({"entity_ids": IDS, "model": "fraud_xgb"}, "model: Extra inputs are not permitted"),
    ],
)
def test_invalid_request_is_refused_naming_the_field(body: dict[str, Any], expected: str) -> None:
    assert expected in refused(body)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_refused(literal: str) -> None:
    # Python's json module reads these as float nan/inf
    message = refused(
        '{"entity_ids": {"user_id": "u", "merchant_id": "m"}, '
        f'"context": {{"ip_risk_score": {literal}}}}}'
    )
    assert message == "context.ip_risk_score: Input should be a finite number"


def test_every_problem_is_listed_once_in_one_message() -> None:
    message = refused({"entity_ids": {"user_id": ""}, "context": {"amount": "x", "foo": 1}})
    for field in ("entity_ids.user_id", "entity_ids.merchant_id", "context.amount", "context.foo"):
        assert message.count(field) == 1, message


def test_request_id_header_validation() -> None:
    assert valid_request_id("abc-1.2_X") == "abc-1.2_X"
    for bad in (None, "", "a b", "x" * 65, "id\n"):
        assert valid_request_id(bad) is None
