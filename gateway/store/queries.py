"""Reads of the store: one request's records, a filtered listing, live quality, the export.

Every read uses ``FINAL``, so the copies an at-least-once log leaves are counted once. The
time window (``since``) is relative to the store's clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.store.backend import Store, rows

POSITIVE_LABEL = "fraud"
CALIBRATION_BUCKETS = 10
#: label values: ``label`` in POST /feedback -> the number quality is computed on
LABEL_VALUES: Mapping[str, float] = {"fraud": 1.0, "legit": 0.0}

_SINCE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_JSON_COLUMNS = ("context", "feature_overrides", "production")
#: the time-window condition of every read; parameter ``since`` in seconds
WINDOW = "ts >= now64(3) - toIntervalSecond({since:UInt32})"

#: the latest label of each request (across sources, by observation time)
LATEST_LABELS = """
    SELECT request_id,
           argMax(label_value, (observed_at, received_at)) AS y,
           argMax(label, (observed_at, received_at)) AS label,
           argMax(source, (observed_at, received_at)) AS source,
           max(observed_at) AS last_observed_at
    FROM prediction_labels FINAL
    GROUP BY request_id
"""


def parse_since(text: str) -> int:
    """``30m``, ``1h``, ``7d``, ``2w`` -> seconds."""
    match = _SINCE.match(text.strip())
    if match is None:
        raise ValueError(f"since {text!r}: use a number and one of s, m, h, d, w (e.g. 1h, 7d)")
    return int(match[1]) * _UNIT_S[match[2]]


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    for name in _JSON_COLUMNS:
        if name in row:
            row[name] = orjson.loads(row[name]) if row[name] else None
    return row


def show(store: Store, request_id: str) -> dict[str, Any] | None:
    """The records (production, canary or direct first, then shadows) and labels of one
    request; None when the store has neither."""
    records = rows(
        store,
        "SELECT * EXCEPT (inserted_at) FROM predictions FINAL WHERE request_id = {rid:String} "
        "ORDER BY arm = 'shadow', deployment_id",
        {"rid": request_id},
    )
    labels = rows(
        store,
        "SELECT source, label, label_value, observed_at, received_at "
        "FROM prediction_labels FINAL WHERE request_id = {rid:String} ORDER BY observed_at",
        {"rid": request_id},
    )
    if not records and not labels:
        return None
    return {"request_id": request_id, "records": [_decoded(r) for r in records], "labels": labels}


def find(
    store: Store,
    model: str,
    since_s: int,
    *,
    entity: str | None = None,
    degraded: bool | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The newest records of ``model`` in the window, with their latest label if any."""
    where = ["model_name = {model:String}", WINDOW]
    params: dict[str, Any] = {"model": model, "since": since_s, "limit": limit}
    if entity is not None:
        where.append("has(mapValues(entity_ids), {entity:String})")
        params["entity"] = entity
    if degraded is not None:
        where.append("is_degraded = {degraded:Bool}")
        params["degraded"] = degraded
    sql = f"""
        SELECT p.request_id AS request_id, p.ts AS ts, p.model_version AS model_version,
               p.arm AS arm, p.door AS door, p.entity_ids AS entity_ids,
               p.prediction AS prediction, p.label_class AS label_class,
               p.is_degraded AS is_degraded, p.degraded_reason AS degraded_reason,
               p.latency_ms AS latency_ms, l.label AS true_label
        FROM (SELECT * FROM predictions FINAL WHERE {" AND ".join(where)}
              ORDER BY ts DESC LIMIT {{limit:UInt32}}) AS p
        LEFT JOIN ({LATEST_LABELS}) AS l ON p.request_id = l.request_id
        ORDER BY p.ts DESC
        SETTINGS join_use_nulls = 1
    """
    return rows(store, sql, params)


def _labelled(model: str) -> str:
    return f"""
        SELECT p.model_version AS model_version, p.arm AS arm, p.prediction AS prediction,
               p.label_class = '{POSITIVE_LABEL}' AS served_positive, l.y AS y,
               dateDiff('millisecond', p.ts, l.last_observed_at) / 1000.0 AS delay_s
        FROM (SELECT request_id, model_version, arm, prediction, label_class, ts
              FROM predictions FINAL
              WHERE model_name = {{model:String}} AND prediction IS NOT NULL
                AND {WINDOW}) AS p
        INNER JOIN ({LATEST_LABELS}) AS l ON p.request_id = l.request_id
    """


def quality(store: Store, model: str, since_s: int) -> list[dict[str, Any]]:
    """Per model version and arm, over labelled rows: AUC, precision and recall of the served
    label, label delay, and calibration buckets (mean score against the observed rate)."""
    params = {"model": model, "since": since_s}
    base = _labelled(model)
    summary = rows(
        store,
        f"""
        SELECT model_version, arm, count() AS n, toUInt64(sum(y)) AS positives,
               arrayAUC(groupArray(prediction), groupArray(toUInt8(y))) AS auc,
               countIf(served_positive AND y = 1) AS tp, countIf(served_positive AND y = 0) AS fp,
               countIf(NOT served_positive AND y = 1) AS fn,
               if(tp + fp > 0, tp / (tp + fp), NULL) AS precision,
               if(tp + fn > 0, tp / (tp + fn), NULL) AS recall,
               quantileExact(0.5)(delay_s) AS label_delay_p50_s,
               quantileExact(0.9)(delay_s) AS label_delay_p90_s
        FROM ({base}) GROUP BY model_version, arm ORDER BY model_version, arm
        """,
        params,
    )
    buckets = rows(
        store,
        f"""
        SELECT model_version, arm,
               toUInt8(least(floor(prediction * {CALIBRATION_BUCKETS}), {CALIBRATION_BUCKETS - 1}))
                   AS bucket,
               count() AS n, avg(prediction) AS mean_score, avg(y) AS observed_rate
        FROM ({base}) GROUP BY model_version, arm, bucket ORDER BY model_version, arm, bucket
        """,
        params,
    )
    for entry in summary:
        entry["calibration"] = [
            {k: b[k] for k in ("bucket", "n", "mean_score", "observed_rate")}
            for b in buckets
            if (b["model_version"], b["arm"]) == (entry["model_version"], entry["arm"])
        ]
    return summary


def export_sql(with_labels: bool, include_degraded: bool) -> str:
    """The served rows of a model as a training set: the vector the model saw, its answer
    and (with labels) the ground truth. Shadow copies are left out (the same request)."""
    degraded = "" if include_degraded else "AND NOT is_degraded"
    join = "INNER JOIN" if with_labels else "LEFT JOIN"
    label_cols = (
        ", l.y AS label, l.label AS label_name, l.source AS label_source" if with_labels else ""
    )
    return f"""
        SELECT p.request_id AS request_id, p.ts AS ts, p.model_name AS model_name,
               p.model_version AS model_version, p.arm AS arm, p.features AS features,
               p.prediction AS prediction, p.label_class AS label_class{label_cols}
        FROM (SELECT * FROM predictions FINAL
              WHERE model_name = {{model:String}} AND arm != 'shadow' AND length(features) > 0
                AND {WINDOW} {degraded}) AS p
        {join} ({LATEST_LABELS}) AS l ON p.request_id = l.request_id
        ORDER BY p.ts
    """


def export_parquet(
    store: Store, model: str, since_s: int, *, with_labels: bool, include_degraded: bool = False
) -> bytes:
    return store.raw(
        export_sql(with_labels, include_degraded), {"model": model, "since": since_s}, "Parquet"
    )
