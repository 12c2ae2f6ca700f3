"""Weighted average of the class probabilities of several models."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Blender:
    """Blends ``[rows, n_classes]`` probability arrays with fixed weights (normalized to sum 1)."""

    def __init__(self, weights: Sequence[float]) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0:
            raise ValueError("weights must be a non-empty list of numbers")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"weights must be finite and non-negative, got {list(weights)}")
        if not np.any(w > 0):
            raise ValueError("at least one weight must be positive")
        self._weights = (w / w.sum()).astype(np.float32)

    @property
    def weights(self) -> list[float]:
        return self._weights.tolist()

    @property
    def n_inputs(self) -> int:
        return len(self._weights)

    def blend(self, probabilities: Sequence[np.ndarray]) -> np.ndarray:
        """Weighted average of ``n_inputs`` arrays of the same shape ``[rows, n_classes]``."""
        if len(probabilities) != self.n_inputs:
            raise ValueError(
                f"expected {self.n_inputs} probability arrays, got {len(probabilities)}"
            )
        arrays = [np.asarray(p, dtype=np.float32) for p in probabilities]
        shape = arrays[0].shape
        if len(shape) != 2:
            raise ValueError(f"probabilities_0 must have shape [rows, classes], got {list(shape)}")
        for i, array in enumerate(arrays[1:], start=1):
            if array.shape != shape:
                raise ValueError(
                    f"probabilities_{i} has shape {list(array.shape)}, "
                    f"probabilities_0 has {list(shape)}"
                )
        return np.tensordot(self._weights, np.stack(arrays), axes=1).astype(np.float32)
