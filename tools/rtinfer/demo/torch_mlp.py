"""Optional PyTorch variant of ``fraud_nn``, exported with ``torch.onnx.export``.

PyTorch is not a dependency (the PyPI wheels pull GBs of CUDA libraries); install it to use
``rtinfer models build --nn-framework torch``. The exported graph has the same interface as the
scikit-learn MLP: ``input__0`` FP32 [batch, n_features] -> ``output__0`` FP32 [batch, 2], with
feature standardization inside the graph.
"""

from __future__ import annotations

import inspect
import io
import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

INPUT_NAME = "input__0"
OUTPUT_NAME = "output__0"


class TorchUnavailable(RuntimeError):
    """PyTorch is needed but not installed."""


def require_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise TorchUnavailable(
            "--nn-framework torch needs PyTorch: pip install torch "
            "(CPU wheels: --index-url https://download.pytorch.org/whl/cpu)"
        ) from exc
    return torch


def train_torch_mlp(
    X: np.ndarray, y: np.ndarray, seed: int, epochs: int = 8, batch_size: int = 256
) -> Any:
    """A 64-32 ReLU MLP with in-graph standardization, softmax probabilities out."""
    torch = require_torch()
    nn = torch.nn
    torch.manual_seed(seed)
    mean = torch.tensor(X.mean(axis=0), dtype=torch.float32)
    std = torch.tensor(X.std(axis=0) + 1e-6, dtype=torch.float32)

    class Standardize(nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)

        def forward(self, x: Any) -> Any:
            return (x - self.mean) / self.std

    logits = nn.Sequential(
        Standardize(),
        nn.Linear(X.shape[1], 64),
        nn.ReLU(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 2),
    )
    optimizer = torch.optim.Adam(logits.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    xs = torch.tensor(X, dtype=torch.float32)
    ys = torch.tensor(y, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    logits.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss_fn(logits(xs[idx]), ys[idx]).backward()
            optimizer.step()
    return nn.Sequential(logits, nn.Softmax(dim=1)).eval()


def export_onnx(model: Any, n_features: int, opset: int) -> bytes:
    """``torch.onnx.export`` with a dynamic batch axis and the serving tensor names."""
    torch = require_torch()
    buffer = io.BytesIO()
    kwargs: dict[str, Any] = {
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        "opset_version": opset,
    }
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter needs no onnxscript
    with torch.no_grad():
        torch.onnx.export(model, torch.zeros(1, n_features), buffer, **kwargs)
    return buffer.getvalue()


def predict(model: Any, X: np.ndarray) -> np.ndarray:
    torch = require_torch()
    with torch.no_grad():
        return model(torch.tensor(X, dtype=torch.float32)).numpy()[:, 1]
