"""ONNX Runtime session for a single-input, single-output classifier on CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

logger = logging.getLogger(__name__)


class OnnxRunner:
    """Runs a ``float32 [rows, n_features] -> float32 [rows, 2]`` ONNX model."""

    def __init__(self, model_path: str | Path, intra_op_threads: int = 1) -> None:
        if intra_op_threads < 1:
            raise ValueError("intra_op_threads must be at least 1")
        options = ort.SessionOptions()
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"{model_path}: expected one input and one output, got inputs "
                f"{[i.name for i in inputs]} and outputs {[o.name for o in outputs]}"
            )
        shape = inputs[0].shape
        if len(shape) != 2 or not isinstance(shape[1], int):
            raise ValueError(
                f"{model_path}: input {inputs[0].name} must have shape [batch, n_features] "
                f"with a fixed n_features, got {shape}"
            )
        self.input_name: str = inputs[0].name
        self.output_name: str = outputs[0].name
        self.n_features: int = shape[1]
        logger.info(
            "loaded %s: %s[%d] -> %s",
            model_path,
            self.input_name,
            self.n_features,
            self.output_name,
        )

    def run(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities ``float32 [rows, 2]`` of ``x`` (``float32 [rows, n_features]``)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(
                f"{self.input_name} must have shape [rows, {self.n_features}], got {list(x.shape)}"
            )
        (y,) = self._session.run([self.output_name], {self.input_name: x})
        y = np.asarray(y, dtype=np.float32)
        if y.shape != (x.shape[0], 2):
            raise ValueError(
                f"{self.output_name} has shape {list(y.shape)}, expected [{x.shape[0]}, 2]"
            )
        return y
