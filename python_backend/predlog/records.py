"""The prediction log's Kafka message: a record as JSON plus its schema version and feature hash."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

try:
    import orjson
except ImportError:  # optional: several times faster than json
    orjson = None

SCHEMA_VERSION = 1


def feature_hash(features: Sequence[float] | np.ndarray) -> str:
    """SHA-256 (hex) of the features as float32 little-endian bytes."""
    return hashlib.sha256(np.asarray(features, dtype="<f4").tobytes()).hexdigest()


def topic_and_key(
    record: Mapping[str, Any], topic: str, shadow_topic: str
) -> tuple[str, str | None]:
    """Where a record goes: shadow records to ``shadow_topic``, keyed by request id."""
    request_id = record.get("request_id")
    chosen = shadow_topic if record.get("arm") == "shadow" else topic
    return chosen, None if request_id is None else str(request_id)


def topic_and_key_of(value: bytes, topic: str, shadow_topic: str) -> tuple[str, str | None]:
    """:func:`topic_and_key` of an encoded record (a spooled one, when it is replayed)."""
    try:
        record = json.loads(value)
    except ValueError:
        return topic, None
    return topic_and_key(record, topic, shadow_topic)


def encode_record(record: Mapping[str, Any]) -> bytes:
    """The Kafka message value: the record plus ``schema_version`` and ``feature_hash``.

    Compact JSON on one line; numpy scalars and arrays become numbers and lists, non-finite
    floats become ``null``.
    """
    features = record.get("features")
    message = {
        "schema_version": SCHEMA_VERSION,
        **record,
        "feature_hash": feature_hash(features) if features is not None else None,
    }
    if orjson is not None:
        return orjson.dumps(message, default=_jsonable, option=orjson.OPT_SERIALIZE_NUMPY)
    try:
        text = json.dumps(message, separators=(",", ":"), allow_nan=False, default=_jsonable)
    except ValueError:  # NaN/inf somewhere: rare, so only then walk the record
        text = json.dumps(_finite(message), separators=(",", ":"), default=_jsonable)
    return text.encode()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode(errors="replace")
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _finite(obj: Any) -> Any:
    if isinstance(obj, (np.generic, np.ndarray)):
        obj = _jsonable(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
