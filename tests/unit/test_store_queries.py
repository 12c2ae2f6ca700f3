"""The store's SQL on the real embedded engine: duplicates collapse, reads filter, live quality
equals scikit-learn's on the same rows, the export round-trips."""

from __future__ import annotations

import io
import time
import uuid
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import precision_score, recall_score, roc_auc_score

from gateway.store import queries
from gateway.store.backend import ChdbStore, rows
from gateway.store.migrate import apply_store_migrations
from gateway.store.rows import encode_rows, label_row, prediction_row


def record(model: str, **fields: Any) -> dict[str, Any]:
    base = {
        "schema_version": 1,
        "request_id": uuid.uuid4().hex,
        "timestamp": time.time() - 60,
        "model_name": model,
        "model_version": "1",
        "deployment_id": 1,
        "arm": "prod",
        "serving_endpoint": f"{model}_pipeline",
        "entity_ids": {"user_id": "u_000001", "merchant_id": "m_00001"},
        "context": {"amount": 12.5},
        "features": [0.5] * 4,
        "prediction": 0.25,
        "label": "legit",
        "confidence": 0.75,
        "degraded": False,
        "degraded_reason": "",
        "latency_ms": 3.0,
        "stage_latency_ms": {"infer": 2.0},
    }
    return {**base, **fields}


def insert(store: ChdbStore, records: list[dict[str, Any]]) -> None:
    store.insert_json(
        "predictions",
        encode_rows(
            [prediction_row(orjson.dumps(r), "predictions", 0, i) for i, r in enumerate(records)]
        ),
    )


def insert_labels(store: ChdbStore, labels: list[dict[str, Any]]) -> None:
    now = time.time()
    store.insert_json(
        "prediction_labels",
        encode_rows(
            [label_row(orjson.dumps({"observed_at": now, "received_at": now, **x})) for x in labels]
        ),
    )


def test_migrations_are_recorded_and_run_once(chdb_store: ChdbStore) -> None:
    assert apply_store_migrations(chdb_store) == []
    versions = rows(chdb_store, "SELECT version FROM schema_migrations FINAL ORDER BY version")
    assert [v["version"] for v in versions] == ["0001_predictions", "0002_prediction_labels"]


def test_copies_of_a_record_collapse_and_shadows_stay_apart(chdb_store: ChdbStore) -> None:
    model = f"m_{uuid.uuid4().hex[:8]}"
    prod = record(model)
    shadow = {**prod, "arm": "shadow", "deployment_id": 7, "production": {"prediction": 0.25}}
    insert(chdb_store, [prod, shadow])
    insert(chdb_store, [prod])  # a replayed duplicate, in another insert (another part)
    n = rows(
        chdb_store,
        "SELECT count() AS n FROM predictions FINAL WHERE model_name = {m:String}",
        {"m": model},
    )
    assert n == [{"n": 2}]
    shown = queries.show(chdb_store, prod["request_id"])
    assert shown is not None
    assert [r["arm"] for r in shown["records"]] == ["prod", "shadow"]
    assert shown["records"][0]["context"] == {"amount": 12.5}
    assert shown["records"][1]["production"] == {"prediction": 0.25}
    assert queries.show(chdb_store, "never-seen") is None


def test_find_filters_by_entity_degraded_and_window(chdb_store: ChdbStore) -> None:
    model = f"m_{uuid.uuid4().hex[:8]}"
    other = {"user_id": "u_000042", "merchant_id": "m_00003"}
    insert(
        chdb_store,
        [
            record(model),
            record(model, entity_ids=other),
            record(model, degraded=True, degraded_reason="feature_store_unavailable:x"),
            record(model, timestamp=time.time() - 3 * 3600),
        ],
    )
    assert len(queries.find(chdb_store, model, 3600)) == 3
    assert len(queries.find(chdb_store, model, 4 * 3600)) == 4
    (hit,) = queries.find(chdb_store, model, 3600, entity="u_000042")
    assert hit["entity_ids"] == other and hit["true_label"] is None
    (deg,) = queries.find(chdb_store, model, 3600, degraded=True)
    assert deg["degraded_reason"] == "feature_store_unavailable:x"


def test_quality_equals_scikit_learn_on_the_same_rows(chdb_store: ChdbStore) -> None:
    model = f"m_{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(3)
    served: list[dict[str, Any]] = []
    labels: list[dict[str, Any]] = []
    for version, arm in (("1", "prod"), ("2", "canary")):
        y = rng.random(300) < 0.3
        # scores correlated with y, rounded so ties occur
        scores = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1), 2)
        for yi, score in zip(y, scores, strict=True):
            r = record(
                model,
                model_version=version,
                arm=arm,
                prediction=float(score),
                label="fraud" if score >= 0.5 else "legit",
            )
            served.append(r)
            labels.append(
                {
                    "request_id": r["request_id"],
                    "source": "chargeback",
                    "label": "fraud" if yi else "legit",
                    "label_value": float(yi),
                }
            )
    # a label corrected later by another source wins; a label of an unknown request is kept
    labels.append({**labels[0], "source": "analyst", "label_value": 1 - labels[0]["label_value"]})
    labels.append(
        {
            "request_id": "not-yet-served",
            "source": "chargeback",
            "label": "fraud",
            "label_value": 1.0,
        }
    )
    insert(chdb_store, served)
    insert_labels(chdb_store, labels[:-2])
    time.sleep(0.01)
    insert_labels(chdb_store, labels[-2:])
    truth = {x["request_id"]: x["label_value"] for x in labels}
    result = {(q["model_version"], q["arm"]): q for q in queries.quality(chdb_store, model, 3600)}
    assert set(result) == {("1", "prod"), ("2", "canary")}
    for (version, arm), q in result.items():
        mine = [r for r in served if (r["model_version"], r["arm"]) == (version, arm)]
        y = np.array([truth[r["request_id"]] for r in mine])
        p = np.array([r["prediction"] for r in mine])
        yhat = np.array([r["label"] == "fraud" for r in mine])
        assert q["n"] == len(mine) and q["positives"] == int(y.sum())
        assert q["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
        assert q["precision"] == pytest.approx(precision_score(y, yhat), abs=1e-6)
        assert q["recall"] == pytest.approx(recall_score(y, yhat), abs=1e-6)
        assert sum(b["n"] for b in q["calibration"]) == len(mine)
        assert q["label_delay_p50_s"] == pytest.approx(60, abs=5)
    # the early label joins once its prediction arrives
    insert(chdb_store, [record(model, request_id="not-yet-served", model_version="3")])
    late = {(q["model_version"], q["arm"]): q for q in queries.quality(chdb_store, model, 3600)}
    assert late[("3", "prod")]["positives"] == 1


def test_export_round_trips_vectors_and_labels(chdb_store: ChdbStore) -> None:
    model = f"m_{uuid.uuid4().hex[:8]}"
    vectors = [[0.125 * i, -1.5, 3.0, 7.25] for i in range(5)]
    served = [record(model, features=v) for v in vectors]
    unlabelled = record(model, features=[9.0] * 4)
    degraded = record(model, degraded=True)
    insert(chdb_store, [*served, unlabelled, degraded])
    insert_labels(
        chdb_store,
        [
            {
                "request_id": r["request_id"],
                "source": "chargeback",
                "label": "fraud",
                "label_value": 1.0,
            }
            for r in served
        ],
    )
    table = pq.read_table(
        io.BytesIO(queries.export_parquet(chdb_store, model, 3600, with_labels=True))
    )
    got = {
        r: (f, y)
        for r, f, y in zip(
            *(table.column(c).to_pylist() for c in ("request_id", "features", "label")), strict=True
        )
    }
    assert got == {r["request_id"]: (r["features"], 1.0) for r in served}
    everything = pq.read_table(
        io.BytesIO(
            queries.export_parquet(
                chdb_store, model, 3600, with_labels=False, include_degraded=True
            )
        )
    )
    assert everything.num_rows == 7


def test_since_parses_units() -> None:
    assert [queries.parse_since(s) for s in ("30s", "15m", "1h", "7d", "2w")] == [
        30,
        900,
        3600,
        604_800,
        1_209_600,
    ]
    with pytest.raises(ValueError, match="since"):
        queries.parse_since("yesterday")
