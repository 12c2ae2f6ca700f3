"""Call the fraud ensembles over Triton's HTTP or gRPC protocol with ``tritonclient``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from python_backend.contract import (
    OUTPUTS,
    InferenceResult,
    context_vector,
    decode,
    ensemble_inputs,
)

Protocol = Literal["http", "grpc"]


#: one row of an ensemble response, as the gateway reads it too
Prediction = InferenceResult


class FraudClient:
    """Thin wrapper over tritonclient for the fraud ensembles (one row or a small batch)."""

    def __init__(self, url: str, protocol: Protocol = "http", timeout_s: float = 10.0) -> None:
        self.protocol = protocol
        self._module: Any = httpclient if protocol == "http" else grpcclient
        if protocol == "http":
            self._client: Any = httpclient.InferenceServerClient(
                url, connection_timeout=timeout_s, network_timeout=timeout_s
            )
        else:
            self._client = grpcclient.InferenceServerClient(url)
        self._timeout_s = timeout_s

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FraudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def predict(
        self,
        model: str,
        user_ids: Sequence[str],
        merchant_ids: Sequence[str],
        context: Sequence[Sequence[float]],
    ) -> list[Prediction]:
        inputs = ensemble_inputs(self._module, user_ids, merchant_ids, context)
        outputs = [self._module.InferRequestedOutput(name) for name in OUTPUTS]
        kwargs: dict[str, Any] = {}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self._timeout_s
        result = self._client.infer(model, inputs, outputs=outputs, **kwargs)
        cols = {name: result.as_numpy(name) for name in OUTPUTS}
        return [
            Prediction(
                prediction=float(cols["prediction"][i][0]),
                label=decode(cols["label"][i][0]),
                confidence=float(cols["confidence"][i][0]),
                degraded=bool(cols["degraded"][i][0]),
                degraded_reason=decode(cols["degraded_reason"][i][0]),
                imputed_count=int(cols["imputed_count"][i][0]),
                features=[float(v) for v in cols["features"][i]],
            )
            for i in range(len(user_ids))
        ]

    def predict_one(
        self, model: str, user_id: str, merchant_id: str, context: Mapping[str, float]
    ) -> Prediction:
        return self.predict(model, [user_id], [merchant_id], [context_vector(context)])[0]
