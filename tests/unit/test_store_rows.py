"""Prediction-log messages to store rows: every producer's records load; poison is named."""

from __future__ import annotations

import orjson
import pytest

from gateway.store.rows import PoisonRecord, label_row, prediction_row

GATEWAY = {
    "schema_version": 1,
    "request_id": "r-1",
    "timestamp": 1_796_000_000.25,
    "model_name": "fraud_xgb",
    "model_version": "2",
    "deployment_id": 14,
    "arm": "canary",
    "serving_endpoint": "fraud_xgb_pipeline__v2",
    "door": "async",
    "entity_ids": {"user_id": "u_000042", "merchant_id": None},
    "context": {"amount": 12.5},
    "feature_overrides": {},
    "features": [0.5, 1.0],
    "feature_hash": "ab12",
    "prediction": 0.91,
    "label": "fraud",
    "confidence": 0.91,
    "degraded": False,
    "degraded_reason": None,
    "latency_ms": 4.5,
    "stage_latency_ms": {"route": 0.1, "infer": 4.0},
}


def row_of(message: dict) -> dict:
    return prediction_row(orjson.dumps(message), "predictions", 3, 42)


def test_a_gateway_record_maps_every_field() -> None:
    row = row_of(GATEWAY)
    assert row["request_id"] == "r-1" and row["deployment_id"] == "14"
    assert row["door"] == "async" and row["arm"] == "canary"
    assert row["entity_ids"] == {"user_id": "u_000042"}
    assert orjson.loads(row["context"]) == {"amount": 12.5}
    assert row["label_class"] == "fraud" and row["is_degraded"] is False
    assert row["degraded_reason"] == "" and row["features_hash"] == "ab12"
    assert (row["source_topic"], row["source_partition"], row["source_offset"]) == (
        "predictions",
        3,
        42,
    )


def test_records_logged_before_the_door_field_load() -> None:
    legacy = {k: v for k, v in GATEWAY.items() if k != "door"}
    assert row_of(legacy)["door"] == "gateway"
    assert row_of({**legacy, "arm": "direct", "deployment_id": None})["door"] == "direct"
    assert row_of({**legacy, "arm": "direct"})["deployment_id"] == "14"


def test_a_failed_shadow_call_loads_with_its_error() -> None:
    shadow = {
        **GATEWAY,
        "arm": "shadow",
        "features": [],
        "prediction": None,
        "label": None,
        "confidence": None,
        "error": {"code": "deadline_exceeded", "message": "shadow took too long"},
        "production": {"prediction": 0.2, "door": "gateway"},
        "sample_pct": 25.0,
    }
    row = row_of(shadow)
    assert row["prediction"] is None and row["label_class"] == ""
    assert row["error_code"] == "deadline_exceeded" and row["sample_pct"] == 25.0
    assert orjson.loads(row["production"]) == {"prediction": 0.2, "door": "gateway"}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{oops", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (orjson.dumps({**GATEWAY, "schema_version": 2}), "unknown_schema_version"),
        (orjson.dumps({**GATEWAY, "request_id": None}), "missing_field"),
        (orjson.dumps({k: v for k, v in GATEWAY.items() if k != "timestamp"}), "missing_field"),
        (orjson.dumps({**GATEWAY, "timestamp": 1_796_000_000_000}), "bad_field"),
        (orjson.dumps({**GATEWAY, "prediction": "high"}), "bad_field"),
        (orjson.dumps({**GATEWAY, "features": [1, "x"]}), "bad_field"),
        (orjson.dumps({**GATEWAY, "door": "carrier-pigeon"}), "bad_field"),
        (orjson.dumps({**GATEWAY, "entity_ids": ["u_1"]}), "bad_field"),
    ],
)
def test_poison_is_refused_with_its_reason(value: bytes, reason: str) -> None:
    with pytest.raises(PoisonRecord) as info:
        prediction_row(value, "predictions", 0, 0)
    assert info.value.reason == reason


def test_a_label_message_maps_and_needs_its_fields() -> None:
    msg = {
        "request_id": "r-1",
        "source": "chargeback",
        "label": "fraud",
        "label_value": 1.0,
        "observed_at": 1_796_000_000.0,
        "received_at": 1_796_000_100.0,
    }
    assert label_row(orjson.dumps(msg)) == msg
    for missing in ("source", "label_value", "observed_at"):
        with pytest.raises(PoisonRecord, match="required"):
            label_row(orjson.dumps({k: v for k, v in msg.items() if k != missing}))
