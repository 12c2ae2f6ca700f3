"""`rtinfer models build --from-parquet`: the models train on an export's vectors and labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from python_backend.feature_spec import METADATA_FILE, ModelMetadata
from rtinfer.cli import app
from rtinfer.demo.dataset import generate_entities, generate_transactions
from rtinfer.demo.served_data import TrainingDataError, load_training_parquet


def export_like(path: Path, X: np.ndarray, y: np.ndarray) -> Path:
    """A file shaped like `rtinfer predictions export --with-labels` writes."""
    table = pa.table(
        {
            "request_id": [f"r-{i}" for i in range(len(y))],
            "features": pa.array(X.tolist(), type=pa.list_(pa.float32())),
            "label": pa.array(y.astype(np.float64)),
        }
    )
    pq.write_table(table, path)
    return path


def test_models_train_on_served_vectors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    X, y, _, _ = generate_transactions(generate_entities(11, 2000, 200), 11, 4000)
    data = export_like(tmp_path / "served.parquet", X, y)
    monkeypatch.setenv("RTINFER_STATE_DIR", str(tmp_path / "state"))
    repo = tmp_path / "repo"
    result = CliRunner().invoke(
        app, ["models", "build", "--from-parquet", str(data), "--repository", str(repo)]
    )
    assert result.exit_code == 0, result.output
    meta = ModelMetadata.load(repo / "fraud_xgb" / "1" / METADATA_FILE)
    assert meta.metrics["auc"] > 0.7  # learnt from the file's labels
    # a second build from the file writes the next version, never over a served one
    again = CliRunner().invoke(
        app, ["models", "build", "--from-parquet", str(data), "--repository", str(repo)]
    )
    assert again.exit_code == 0, again.output
    assert (repo / "fraud_nn" / "2" / "model.onnx").is_file()


def test_files_that_cannot_train_are_refused(tmp_path: Path) -> None:
    X, y, _, _ = generate_transactions(generate_entities(11, 2000, 200), 11, 400)
    with pytest.raises(TrainingDataError, match="at least"):
        load_training_parquet(export_like(tmp_path / "few.parquet", X[:50], y[:50]))
    with pytest.raises(TrainingDataError, match="values"):
        load_training_parquet(export_like(tmp_path / "narrow.parquet", X[:, :10], y))
    with pytest.raises(TrainingDataError, match="0 or 1"):
        load_training_parquet(export_like(tmp_path / "scores.parquet", X, y * 0.5))
    pq.write_table(pa.table({"features": [[1.0]]}), tmp_path / "unlabelled.parquet")
    with pytest.raises(TrainingDataError, match="labelled export"):
        load_training_parquet(tmp_path / "unlabelled.parquet")
