"""Prediction records of direct Triton clients, written where the prediction is made.

Clients calling a pipeline ensemble over Triton's own HTTP/gRPC API never pass the gateway, so
the pipeline's postprocess step logs their predictions: one record per row, the same schema
as the gateway's (docs/prediction-log.md) with ``arm`` ``direct``, no deployment, and
``latency_ms`` ``null`` (Triton's own metrics time the request). Requests carrying the
:data:`~python_backend.contract.LOGGED_BY` parameter are skipped: their caller logs them (the
gateway) or they are not predictions (probes). Each row is logged exactly once either way.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from python_backend.contract import CONTEXT_FEATURES, LOGGED_BY
from python_backend.postprocess import PostprocessOutput
from python_backend.predlog.sink import PredictionLog
from python_backend.predlog.slots import open_in_free_slot
from python_backend.predlog.writer import KafkaPredictionLog

DIRECT_ARM = "direct"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineIdentity:
    """What a record says served it: the public model, its version and the ensemble."""

    model_name: str
    model_version: str
    serving_endpoint: str


@dataclass(frozen=True)
class DirectRequest:
    """One Triton request of a batch, as far as the log needs it."""

    request_id: str
    offset: int  # first row of this request in the batch
    rows: int
    user_ids: np.ndarray | None  # BYTES [rows, 1]
    merchant_ids: np.ndarray | None
    context: np.ndarray | None  # FP32 [rows, len(CONTEXT_FEATURES)]


def parameters_of(raw: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """A request's parameters (the python backend hands them over as a JSON string)."""
    if not raw:
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def logged_elsewhere(parameters: Mapping[str, Any]) -> bool:
    """True when the caller logs the request itself, or it is a probe."""
    return bool(parameters.get(LOGGED_BY))


def row_request_ids(request_id: str, rows: int) -> list[str]:
    """Per-row record ids: the Triton request id (a new one when the client sent none);
    ``<id>/<row>`` when one request carries several rows."""
    base = request_id or uuid.uuid4().hex
    return [base] if rows == 1 else [f"{base}/{i}" for i in range(rows)]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _column_text(values: np.ndarray | None, i: int) -> str | None:
    return None if values is None else _text(values.reshape(-1)[i])


def _contexts(requests: Sequence[DirectRequest]) -> list[list[dict[str, float | None]]]:
    """Per request, each row's context by name: the float32 values Triton received, exactly
    (0.2 arrives as 0.20000000298023224); NaN (not sent, imputed) as ``None``."""
    made = []
    for r in requests:
        if r.context is None:
            made.append([{} for _ in range(r.rows)])
            continue
        rows = np.asarray(r.context, np.float32).reshape(r.rows, -1).tolist()
        made.append(
            [
                {
                    name: (v if math.isfinite(v) else None)
                    for name, v in zip(CONTEXT_FEATURES, row, strict=False)
                }
                for row in rows
            ]
        )
    return made


class DirectLog:
    """Builds and hands the records of one postprocess batch to a prediction log."""

    def __init__(self, sink: PredictionLog, identity: PipelineIdentity) -> None:
        self._sink = sink
        self._identity = identity

    def records(
        self,
        requests: Sequence[DirectRequest],
        features: np.ndarray,
        out: PostprocessOutput,
        timestamp: float | None = None,
    ) -> list[dict[str, Any]]:
        """Records of ``requests``; a request's rows start at its ``offset`` in the batch's
        ``features`` and ``out``."""
        ident = self._identity
        now = time.time() if timestamp is None else timestamp
        made: list[dict[str, Any]] = []
        for req, contexts in zip(requests, _contexts(requests), strict=True):
            for i, rid in enumerate(row_request_ids(req.request_id, req.rows)):
                row = req.offset + i
                reason = _text(out.degraded_reason[row])
                made.append(
                    {
                        "request_id": rid,
                        "timestamp": now,
                        "model_name": ident.model_name,
                        "model_version": ident.model_version,
                        "deployment_id": None,
                        "arm": DIRECT_ARM,
                        "door": DIRECT_ARM,
                        "serving_endpoint": ident.serving_endpoint,
                        "entity_ids": {
                            "user_id": _column_text(req.user_ids, i),
                            "merchant_id": _column_text(req.merchant_ids, i),
                        },
                        "context": contexts[i],
                        "feature_overrides": {},
                        "features": features[row],
                        "prediction": float(out.prediction[row]),
                        "label": _text(out.label[row]),
                        "confidence": float(out.confidence[row]),
                        "degraded": bool(out.degraded[row]),
                        "degraded_reason": reason or None,
                        "latency_ms": None,
                        "stage_latency_ms": {},
                    }
                )
        return made

    def log(
        self, requests: Sequence[DirectRequest], features: np.ndarray, out: PostprocessOutput
    ) -> int:
        """Log every row of ``requests``; returns the number of records handed over."""
        if not requests:
            return 0
        records = self.records(requests, features, out)
        log_many = getattr(self._sink, "log_many", None)
        if log_many is not None:  # one journal write for the batch
            log_many(records)
        else:
            for record in records:
                self._sink.log(record)
        return len(records)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush the sink (what Kafka does not take in time is spooled), if it can close."""
        close = getattr(self._sink, "close", None)
        if close is not None:
            close(timeout_s)


def open_direct_log(params: Mapping[str, str], instance: str) -> DirectLog | None:
    """The direct-client log of one postprocess instance, from its model parameters; ``None``
    when ``prediction_log_bootstrap`` is empty (logging off).

    Each instance owns a spool slot ``<prediction_log_spool_dir>/<instance>-<n>`` (the old
    and the new instance of a reloaded model run side by side for a moment), so what Kafka
    could not take survives restarts and is replayed by the next owner of the slot.
    """
    bootstrap = params.get("prediction_log_bootstrap", "")
    spool_root = params.get("prediction_log_spool_dir", "")
    if not bootstrap:
        return None
    if not spool_root:
        raise ValueError("prediction_log_spool_dir is required with prediction_log_bootstrap")
    linger_ms = float(params.get("prediction_log_linger_ms") or 50.0)
    sink = open_in_free_slot(
        Path(spool_root),
        instance,
        lambda slot: KafkaPredictionLog(bootstrap, spool_dir=slot, linger_ms=linger_ms),
    )
    identity = PipelineIdentity(
        model_name=params.get("log_model_name", ""),
        model_version=params.get("log_model_version", ""),
        serving_endpoint=params.get("serving_endpoint", ""),
    )
    log.info("direct predictions of %s logged to Kafka %s", identity.serving_endpoint, bootstrap)
    return DirectLog(sink, identity)
