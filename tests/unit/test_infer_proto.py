"""The ensemble call's raw protobufs match what tritonclient would send and read."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from test_triton_client_budget import response
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request

from gateway.serving.infer_proto import MalformedResponse, infer_request, results
from python_backend.contract import OUTPUTS, ensemble_inputs

USERS, MERCHANTS = ["u_000001", "u_é2"], ["m_00001", "m_00002"]
CONTEXT = [[float(i) for i in range(10)], [float("nan")] * 10]


def test_request_equals_tritonclients() -> None:
    ours = infer_request(
        "fraud_xgb_pipeline",
        USERS,
        MERCHANTS,
        CONTEXT,
        request_id="r1",
        timeout_us=80_000,
        logged_by="gateway",
    )
    theirs = _get_inference_request(
        model_name="fraud_xgb_pipeline",
        inputs=ensemble_inputs(grpcclient, USERS, MERCHANTS, CONTEXT),
        model_version="",
        request_id="r1",
        outputs=[grpcclient.InferRequestedOutput(name) for name in OUTPUTS],
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=80_000,
        parameters={"rtinfer_logged_by": "gateway"},
    )
    assert ours == theirs


def test_results_read_every_row() -> None:
    rows = results(response(3), 3)
    assert len(rows) == 3
    first = rows[0]
    assert (first.prediction, first.label, first.confidence) == (0.25, "legit", 0.75)
    assert (first.degraded, first.degraded_reason, first.imputed_count) == (False, "", 0)
    assert first.features == [0.5] * 50


def test_strings_of_different_lengths() -> None:
    out = response(2)
    names = [o.name for o in out.outputs]
    reasons = (b"", "feature_store_unavailable:é".encode())
    out.raw_output_contents[names.index("degraded_reason")] = b"".join(
        struct.pack("<I", len(v)) + v for v in reasons
    )
    out.raw_output_contents[names.index("degraded")] = np.array([False, True]).tobytes()
    first, second = results(out, 2)
    assert (first.degraded, first.degraded_reason) == (False, "")
    assert (second.degraded, second.degraded_reason) == (True, "feature_store_unavailable:é")


def test_a_response_without_the_outputs_is_malformed() -> None:
    with pytest.raises(MalformedResponse):
        results(service_pb2.ModelInferResponse(), 1)
    with pytest.raises(MalformedResponse):
        results(response(1), 2)  # fewer rows than asked for
