"""What the serving core hands every served prediction to: the prediction-log protocol.

:class:`python_backend.predlog.writer.KafkaPredictionLog` is the production implementation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class PredictionLog(Protocol):
    """Where every served prediction is recorded (e.g. Kafka).

    ``log`` is called on the event loop once per prediction, after its response is computed.
    It must return at once (hand the record to a buffer or a thread) and never raise. The
    record holds: request_id, timestamp (unix seconds), model_name, model_version,
    deployment_id, arm, serving_endpoint, entity_ids, context (as sent), feature_overrides,
    features (the served vector; empty when the fallback served), prediction, label,
    confidence, degraded, degraded_reason, latency_ms, stage_latency_ms.

    Requests mirrored to a shadow deployment give a second record with ``arm == "shadow"``
    and the same request_id, plus ``production`` (what production served), ``error`` (the
    shadow's failure or ``None``) and ``sample_pct`` (see docs/prediction-log.md).
    """

    def log(self, record: Mapping[str, Any]) -> None: ...


class DiscardPredictionLog:
    """The default when no prediction log is configured: records are dropped."""

    def log(self, record: Mapping[str, Any]) -> None:
        return None
