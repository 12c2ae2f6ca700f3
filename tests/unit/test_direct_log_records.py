"""Records of direct Triton clients, built by the postprocess step (no Triton, no Kafka)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
import pytest

from python_backend.contract import CONTEXT_FEATURES, LOGGED_BY
from python_backend.direct_log import (
    DirectLog,
    DirectRequest,
    PipelineIdentity,
    logged_elsewhere,
    open_direct_log,
    parameters_of,
    row_request_ids,
)
from python_backend.postprocess import PostprocessOutput
from python_backend.predlog.records import encode_record

IDENTITY = PipelineIdentity("fraud_xgb", "3", "fraud_xgb_pipeline__v3")


class Sink:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def log(self, record: Mapping[str, Any]) -> None:
        self.records.append(dict(record))


def _out(n: int) -> PostprocessOutput:
    return PostprocessOutput(
        prediction=np.linspace(0.1, 0.9, n, dtype=np.float32),
        label=np.array(["legit"] * (n - 1) + ["fraud"], dtype=object),
        confidence=np.full(n, 0.8, dtype=np.float32),
        degraded=np.array([False] * (n - 1) + [True]),
        degraded_reason=np.array([""] * (n - 1) + ["feature_store_unavailable:x"], dtype=object),
    )


def _request(rid: str, offset: int, rows: int) -> DirectRequest:
    ctx = np.tile(np.float32([0.2] + [np.nan] * (len(CONTEXT_FEATURES) - 1)), (rows, 1))
    return DirectRequest(
        request_id=rid,
        offset=offset,
        rows=rows,
        user_ids=np.array([[f"u{offset + i}".encode()] for i in range(rows)], dtype=object),
        merchant_ids=np.array([[b"m1"]] * rows, dtype=object),
        context=ctx,
    )


def test_rows_of_direct_requests_become_records_at_their_offsets() -> None:
    sink = Sink()
    features = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    out = _out(4)
    # row 0 belongs to a request the gateway logs; rows 1-3 to two direct requests
    n = DirectLog(sink, IDENTITY).log([_request("a", 1, 1), _request("b", 2, 2)], features, out)
    assert n == 3
    assert [r["request_id"] for r in sink.records] == ["a", "b/0", "b/1"]
    first, _, last = sink.records
    assert first["entity_ids"] == {"user_id": "u1", "merchant_id": "m1"}
    assert first["features"].tolist() == [3.0, 4.0, 5.0]
    assert first["prediction"] == pytest.approx(float(out.prediction[1]))
    assert (first["arm"], first["deployment_id"], first["latency_ms"]) == ("direct", None, None)
    assert (first["model_name"], first["model_version"]) == ("fraud_xgb", "3")
    assert first["serving_endpoint"] == "fraud_xgb_pipeline__v3"
    assert first["degraded_reason"] is None
    assert first["context"]["amount"] == float(np.float32(0.2))  # what Triton received
    assert first["context"]["hour_of_day"] is None  # NaN: not sent, imputed
    assert (last["degraded"], last["degraded_reason"]) == (True, "feature_store_unavailable:x")
    assert last["label"] == "fraud"


def test_records_encode_to_the_log_schema() -> None:
    sink = Sink()
    DirectLog(sink, IDENTITY).log([_request("a", 0, 1)], np.ones((1, 3), np.float32), _out(1))
    message = orjson.loads(encode_record(sink.records[0]))
    assert message["schema_version"] == 1 and len(message["feature_hash"]) == 64
    assert message["features"] == [1.0, 1.0, 1.0]


def test_request_without_entity_inputs_still_logs() -> None:
    sink = Sink()
    bare = DirectRequest("x", 0, 1, None, None, None)
    DirectLog(sink, IDENTITY).log([bare], np.ones((1, 2), np.float32), _out(1))
    assert sink.records[0]["entity_ids"] == {"user_id": None, "merchant_id": None}
    assert sink.records[0]["context"] == {}


def test_request_ids() -> None:
    assert row_request_ids("r1", 1) == ["r1"]
    assert row_request_ids("r1", 2) == ["r1/0", "r1/1"]
    (made,) = row_request_ids("", 1)
    assert len(made) == 32 and made != row_request_ids("", 1)[0]


@pytest.mark.parametrize(
    ("raw", "elsewhere"),
    [
        (None, False),
        ("", False),
        ("{}", False),
        ('{"other": 1}', False),
        (f'{{"{LOGGED_BY}": "gateway"}}', True),
        (f'{{"{LOGGED_BY}": "probe"}}', True),
        ({LOGGED_BY: "gateway"}, True),
        ("not json", False),
        ("[1, 2]", False),
    ],
)
def test_who_logs_a_request(raw: Any, elsewhere: bool) -> None:
    assert logged_elsewhere(parameters_of(raw)) is elsewhere


def test_no_bootstrap_means_no_direct_log() -> None:
    assert open_direct_log({"prediction_log_bootstrap": ""}, "post_0_0") is None


def test_bootstrap_without_spool_dir_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="prediction_log_spool_dir"):
        open_direct_log({"prediction_log_bootstrap": "127.0.0.1:1"}, "post_0_0")
