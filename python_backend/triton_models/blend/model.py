"""Triton python-backend shell of the weighted probability blend.

Inputs ``probabilities_0`` ... ``probabilities_{k-1}`` (FP32 [rows, 2], one per weight in the
``weights`` parameter); output ``probabilities`` (FP32 [rows, 2]). The logic lives in
:mod:`python_backend.blend`.
"""

from __future__ import annotations

import logging
from typing import Any

import triton_python_backend_utils as pb_utils

from python_backend.blend import Blender
from python_backend.triton_config import model_config, param_list

logger = logging.getLogger(__name__)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = model_config(args)
        weights = param_list(config, "weights", float)
        if not weights:
            raise pb_utils.TritonModelException("model parameter weights is required")
        self._blender = Blender(weights)
        self._inputs = [f"probabilities_{i}" for i in range(self._blender.n_inputs)]
        logger.info("blend weights %s", self._blender.weights)

    def execute(self, requests: list[Any]) -> list[Any]:
        # Blending is a few vector operations: per request is as cheap as batching and keeps
        # a malformed request from touching the others.
        return [self._blend(request) for request in requests]

    def _blend(self, request: Any) -> Any:
        arrays = []
        for name in self._inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return _invalid(f"missing input {name}")
            arrays.append(tensor.as_numpy())
        try:
            blended = self._blender.blend(arrays)
        except ValueError as exc:
            return _invalid(str(exc))
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("probabilities", blended)]
        )

    def finalize(self) -> None:
        logger.info("blend unloading")


def _invalid(message: str) -> Any:
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )
