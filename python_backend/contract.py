"""The tensor contract of the fraud pipelines: what goes into an ensemble and what comes out.

One definition for every side: the feature assembler reads these inputs inside Triton, the
gateway, the deployer's probes and smoke tests, the demo data, the CLI client and the
benchmarks build them, and the postprocess step's outputs are read back by these names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: request context sent with every prediction, in model-input order
CONTEXT_FEATURES = (
    "amount",
    "hour_of_day",
    "day_of_week",
    "channel",
    "is_international",
    "card_present",
    "device_age_days",
    "ip_risk_score",
    "distance_from_home_km",
    "is_new_device",
)

#: ensemble inputs: entity ids (BYTES, one per row) and the context vector (FP32)
USER_ID = "user_id"
MERCHANT_ID = "merchant_id"
CONTEXT = "context"
INPUTS = (USER_ID, MERCHANT_ID, CONTEXT)

#: ensemble outputs, one row each per request row
OUTPUTS = (
    "prediction",
    "label",
    "confidence",
    "degraded",
    "degraded_reason",
    "imputed_count",
    "features",
)


#: Triton request parameter naming who records a request in the prediction log. Absent: the
#: pipeline's postprocess step logs it (a direct Triton client). ``gateway``: the caller logs it
#: (the gateway's doors log what they serve, fallbacks included). ``probe``: a health or smoke
#: check, not a prediction, never logged.
LOGGED_BY = "rtinfer_logged_by"
LOGGED_BY_GATEWAY = "gateway"
LOGGED_BY_PROBE = "probe"


@dataclass(frozen=True)
class InferenceResult:
    """One row of an ensemble response (the ``OUTPUTS``, read back)."""

    prediction: float
    label: str
    confidence: float
    degraded: bool
    degraded_reason: str
    imputed_count: int
    features: list[float]

    def to_dict(self, with_features: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not with_features:
            out.pop("features")
        return out


def context_vector(context: Mapping[str, float]) -> list[float]:
    """Request context in model order; a missing feature is sent as NaN (imputed in Triton)."""
    unknown = set(context) - set(CONTEXT_FEATURES)
    if unknown:
        raise ValueError(f"unknown context features: {sorted(unknown)}")
    return [float(context.get(name, float("nan"))) for name in CONTEXT_FEATURES]


def ensemble_inputs(
    module: Any, user_ids: Sequence[str], merchant_ids: Sequence[str], context: Any
) -> list:
    """The ensemble's input tensors, built with ``module.InferInput`` (``tritonclient.grpc``,
    ``tritonclient.http`` or their aio variants)."""
    ctx = np.asarray(context, dtype=np.float32).reshape(len(user_ids), -1)
    tensors = [
        (USER_ID, np.array([[u.encode()] for u in user_ids], dtype=object), "BYTES"),
        (MERCHANT_ID, np.array([[m.encode()] for m in merchant_ids], dtype=object), "BYTES"),
        (CONTEXT, ctx, "FP32"),
    ]
    out = []
    for name, arr, dtype in tensors:
        inp = module.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def decode(value: Any) -> str:
    """A BYTES output element as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
