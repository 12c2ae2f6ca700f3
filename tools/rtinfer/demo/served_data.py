"""A training set from the prediction store's export (``rtinfer predictions export
--with-labels``): the vectors the models were served, with their ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rtinfer.demo.dataset import feature_names

#: fewer rows cannot fill the 70/15/15 split with both classes in each part
MIN_ROWS = 200


class TrainingDataError(ValueError):
    """The file is not a labelled export this project can train on."""


def load_training_parquet(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(X float32 [rows, n_features], y int64 [rows]) from the export's ``features`` and
    ``label`` columns, in the file's row order (oldest first)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["features", "label"])
    except (OSError, KeyError, ValueError) as exc:
        raise TrainingDataError(
            f"{path}: not a labelled export (features and label columns): {exc}"
        ) from None
    features = table.column("features").to_pylist()
    labels = table.column("label").to_pylist()
    width = len(feature_names())
    if len(features) < MIN_ROWS:
        raise TrainingDataError(f"{path}: {len(features)} rows; at least {MIN_ROWS} are needed")
    if any(f is None or len(f) != width for f in features):
        raise TrainingDataError(f"{path}: every features vector must have {width} values")
    if any(v not in (0.0, 1.0) for v in labels):
        raise TrainingDataError(f"{path}: labels must be 0 or 1 (export with --with-labels)")
    X = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    for part in (
        y[: int(0.7 * len(y))],
        y[int(0.7 * len(y)) : int(0.85 * len(y))],
        y[int(0.85 * len(y)) :],
    ):
        if part.min() == part.max():
            raise TrainingDataError(f"{path}: each split (70/15/15) needs both classes")
    return X, y
