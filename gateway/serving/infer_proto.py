"""The ensemble call as raw KServe v2 gRPC messages, without tritonclient's tensor wrappers.

``infer_request`` builds the ``ModelInferRequest`` of some rows directly, tensors as
``raw_input_contents`` (BYTES as 4-byte little-endian length + bytes per element, FP32 as
little-endian floats); ``results`` reads the rows back from a ``ModelInferResponse``'s
``raw_output_contents``. This is the gateway's hot path: tritonclient's ``InferInput`` /
``InferResult`` objects cost about a fifth of the client CPU of a call here
(docs/benchmarks.md).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
from tritonclient.grpc import service_pb2

from python_backend.contract import (
    CONTEXT,
    CONTEXT_FEATURES,
    LOGGED_BY,
    MERCHANT_ID,
    OUTPUTS,
    USER_ID,
    InferenceResult,
)

_LENGTH = struct.Struct("<I")


class MalformedResponse(ValueError):
    """The response does not hold the ensemble's outputs for every row."""


def _bytes_tensor(values: Sequence[str]) -> bytes:
    parts = []
    for value in values:
        raw = value.encode()
        parts.append(_LENGTH.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def infer_request(
    endpoint: str,
    user_ids: Sequence[str],
    merchant_ids: Sequence[str],
    contexts: Sequence[Sequence[float]],
    *,
    request_id: str,
    timeout_us: int,
    logged_by: str,
) -> service_pb2.ModelInferRequest:
    """One request for ``len(user_ids)`` rows, asking for every ensemble output."""
    n = len(user_ids)
    request = service_pb2.ModelInferRequest(model_name=endpoint, id=request_id)
    for name, datatype, width in (
        (USER_ID, "BYTES", 1),
        (MERCHANT_ID, "BYTES", 1),
        (CONTEXT, "FP32", len(CONTEXT_FEATURES)),
    ):
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = name, datatype
        tensor.shape.extend((n, width))
    request.raw_input_contents.extend(
        (
            _bytes_tensor(user_ids),
            _bytes_tensor(merchant_ids),
            np.asarray(contexts, dtype="<f4").reshape(n, -1).tobytes(),
        )
    )
    for name in OUTPUTS:
        request.outputs.add().name = name
    request.parameters[LOGGED_BY].string_param = logged_by
    request.parameters["timeout"].int64_param = timeout_us
    return request


def _strings(raw: bytes, n: int) -> list[str]:
    out, offset = [], 0
    for _ in range(n):
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        out.append(raw[offset : offset + size].decode(errors="replace"))
        offset += size
    return out


def results(response: service_pb2.ModelInferResponse, n: int) -> list[InferenceResult]:
    """The ``n`` rows of an ensemble response."""
    raw = dict(zip((o.name for o in response.outputs), response.raw_output_contents, strict=False))
    try:
        prediction = np.frombuffer(raw["prediction"], "<f4", n).tolist()
        confidence = np.frombuffer(raw["confidence"], "<f4", n).tolist()
        degraded = np.frombuffer(raw["degraded"], np.bool_, n).tolist()
        imputed = np.frombuffer(raw["imputed_count"], "<i4", n).tolist()
        features = np.frombuffer(raw["features"], "<f4").reshape(n, -1).tolist()
        label, reason = _strings(raw["label"], n), _strings(raw["degraded_reason"], n)
    except (KeyError, ValueError, struct.error) as exc:
        raise MalformedResponse(f"no outputs for {n} rows: {exc!r}") from None
    return [
        InferenceResult(
            prediction[i], label[i], confidence[i], degraded[i], reason[i], imputed[i], features[i]
        )
        for i in range(n)
    ]
