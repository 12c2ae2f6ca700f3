"""Triton python-backend shell serving an ONNX classifier on CPU with ONNX Runtime.

Serves ``fraud_xgb``, ``fraud_nn`` and ``fraud_context_lr`` on the ``cpu`` target: one input
(FP32 [rows, n_features]) and one output (FP32 [rows, 2]). All requests of a batch go through a
single ONNX Runtime call. The logic lives in :mod:`python_backend.onnx_runner`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend.onnx_runner import OnnxRunner
from python_backend.triton_config import get_param, model_config, param_int, version_dir

logger = logging.getLogger(__name__)


def _error(message: str, code: Any = None) -> Any:
    if code is None:
        code = pb_utils.TritonError.INVALID_ARG
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = model_config(args)
        if len(config.get("input", [])) != 1 or len(config.get("output", [])) != 1:
            raise pb_utils.TritonModelException("onnx_runner needs one input and one output")
        self._input = config["input"][0]["name"]
        self._output = config["output"][0]["name"]
        model_file = get_param(config, "model_file", "model.onnx") or "model.onnx"
        self._runner = OnnxRunner(
            os.path.join(version_dir(args), model_file),
            intra_op_threads=param_int(config, "intra_op_threads", 1),
        )
        self._name = args["model_name"]

    def execute(self, requests: list[Any]) -> list[Any]:
        n = self._runner.n_features
        responses: list[Any] = [None] * len(requests)
        batch: list[tuple[int, np.ndarray]] = []
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self._input)
            if tensor is None:
                responses[i] = _error(f"missing input {self._input}")
                continue
            x = tensor.as_numpy()
            if x.ndim != 2 or x.shape[1] != n:
                responses[i] = _error(
                    f"{self._input} must have shape [rows, {n}], got {list(x.shape)}"
                )
                continue
            batch.append((i, x))
        if not batch:
            return responses
        try:
            y = self._runner.run(np.concatenate([x for _, x in batch]))
        except Exception as exc:
            logger.exception("%s: ONNX Runtime failed on %d requests", self._name, len(batch))
            for i, _ in batch:
                responses[i] = _error(
                    f"{self._name}: inference failed: {exc}", pb_utils.TritonError.INTERNAL
                )
            return responses
        start = 0
        for i, x in batch:
            end = start + len(x)
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(self._output, y[start:end])]
            )
            start = end
        return responses

    def finalize(self) -> None:
        logger.info("%s: unloading", self._name)
