"""Kafka messages to store rows: a prediction record, or a label from ``POST /feedback``.

Records of every schema-1 producer load: the gateway's and the async worker's (``door`` set
since the store exists, absent before: then ``gateway``), the pipelines' direct records
(``arm`` ``direct``), and shadow records (``production``, ``error``, ``sample_pct``). A message
that cannot be stored raises :class:`PoisonRecord` with the reason; the sink dead-letters it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

from python_backend.predlog.records import SCHEMA_VERSION

DOORS = ("gateway", "async", "direct")
LABEL_SCHEMA_VERSION = 1
#: what JSON numbers decode to (bool is not one of them: ``type(True) is bool``)
_NUMBER_TYPES = frozenset((int, float))


class PoisonRecord(ValueError):
    """A message the store cannot hold; ``reason`` is a short machine-readable cause."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _object(value: bytes) -> dict[str, Any]:
    try:
        message = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise PoisonRecord("invalid_json", str(exc)) from None
    if not isinstance(message, dict):
        raise PoisonRecord("not_an_object", f"a JSON {type(message).__name__}")
    return message


def _text(message: Mapping[str, Any], name: str, *, required: bool = False) -> str:
    value = message.get(name)
    if value is None or value == "":
        if required:
            raise PoisonRecord("missing_field", f"{name} is required")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PoisonRecord("bad_field", f"{name} must be a string, got {type(value).__name__}")
    return str(value)


def _number(message: Mapping[str, Any], name: str) -> float | None:
    value = message.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PoisonRecord("bad_field", f"{name} must be a finite number, got {value!r}")
    return float(value)


def _timestamp(message: Mapping[str, Any], name: str) -> float:
    ts = _number(message, name)
    if ts is None:
        raise PoisonRecord("missing_field", f"{name} is required")
    if not 0 < ts < 4_102_444_800:  # before 2100
        raise PoisonRecord("bad_field", f"{name} {ts} is not a Unix time in seconds")
    return ts


def _features(message: Mapping[str, Any]) -> list[float]:
    features = message.get("features") or []
    if not isinstance(features, list) or not set(map(type, features)) <= _NUMBER_TYPES:
        raise PoisonRecord("bad_field", "features must be an array of numbers")
    return features


def _json(value: Any) -> str:
    return "" if value is None else orjson.dumps(value).decode()


def _door(message: Mapping[str, Any], arm: str) -> str:
    door = message.get("door")
    if door is None:
        production = message.get("production") or {}
        door = "direct" if arm == "direct" else production.get("door", "gateway")
    if door not in DOORS:
        raise PoisonRecord("bad_field", f"door must be one of {', '.join(DOORS)}, got {door!r}")
    return str(door)


def prediction_row(value: bytes, topic: str, partition: int, offset: int) -> dict[str, Any]:
    """The ``predictions`` row of one prediction-log message."""
    message = _object(value)
    version = message.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise PoisonRecord("unknown_schema_version", f"schema_version {version!r}")
    arm = _text(message, "arm", required=True)
    entity_ids = message.get("entity_ids") or {}
    if not isinstance(entity_ids, dict):
        raise PoisonRecord("bad_field", "entity_ids must be an object")
    error = message.get("error") or {}
    stages = message.get("stage_latency_ms") or {}
    return {
        "request_id": _text(message, "request_id", required=True),
        "arm": arm,
        "deployment_id": _text(message, "deployment_id"),
        "ts": _timestamp(message, "timestamp"),
        "model_name": _text(message, "model_name", required=True),
        "model_version": _text(message, "model_version"),
        "serving_endpoint": _text(message, "serving_endpoint"),
        "door": _door(message, arm),
        "entity_ids": {str(k): str(v) for k, v in entity_ids.items() if v is not None},
        "context": _json(message.get("context")),
        "feature_overrides": _json(message.get("feature_overrides") or {}),
        "features": _features(message),
        "features_hash": _text(message, "feature_hash"),
        "prediction": _number(message, "prediction"),
        "label_class": _text(message, "label"),
        "confidence": _number(message, "confidence"),
        "latency_ms": _number(message, "latency_ms"),
        "stage_latency_ms": {
            str(k): float(v) for k, v in stages.items() if isinstance(v, (int, float))
        },
        "is_degraded": bool(message.get("degraded", False)),
        "degraded_reason": _text(message, "degraded_reason"),
        "production": _json(message.get("production")),
        "error_code": str(error.get("code") or "") if isinstance(error, dict) else "",
        "error_message": str(error.get("message") or "") if isinstance(error, dict) else "",
        "sample_pct": _number(message, "sample_pct"),
        "schema_version": SCHEMA_VERSION,
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
    }


def label_row(value: bytes) -> dict[str, Any]:
    """The ``prediction_labels`` row of one ``prediction-labels`` message (see feedback)."""
    message = _object(value)
    value_ = _number(message, "label_value")
    if value_ is None:
        raise PoisonRecord("missing_field", "label_value is required")
    return {
        "request_id": _text(message, "request_id", required=True),
        "source": _text(message, "source", required=True),
        "label": _text(message, "label", required=True),
        "label_value": value_,
        "observed_at": _timestamp(message, "observed_at"),
        "received_at": _timestamp(message, "received_at"),
    }


def encode_rows(rows: list[dict[str, Any]]) -> bytes:
    """JSONEachRow lines of ``rows``."""
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)
