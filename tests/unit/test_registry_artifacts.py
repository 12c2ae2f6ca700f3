"""What a model version directory may register in MLflow, and its content hash."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from python_backend.feature_spec import (
    FEATURE_SPEC_FILE,
    METADATA_FILE,
    TRAINING_STATS_FILE,
    FeatureDef,
    FeatureSpec,
    ModelMetadata,
)
from rtinfer.registry import (
    ArtifactRefused,
    RegistryError,
    artifact_files,
    content_hash,
    model_signature,
)

SPEC = FeatureSpec(
    features=[
        FeatureDef(name=n, group="context", default=0.0, min=-1.0, max=1.0)
        for n in ("amount", "hour_of_day", "channel")
    ]
)


def _version_dir(root: Path, artifacts: dict[str, str] | None = None) -> Path:
    """A version directory with an ONNX and an XGBoost JSON artifact (contents not parsed)."""
    artifacts = artifacts or {"onnx": "model.onnx", "xgboost": "xgboost.json"}
    path = root / "fraud_xgb" / "1"
    path.mkdir(parents=True)
    (path / "model.onnx").write_bytes(b"\x08\x08onnx-graph")
    (path / "xgboost.json").write_text('{"learner": {}}')
    SPEC.save(path / FEATURE_SPEC_FILE)
    (path / TRAINING_STATS_FILE).write_text("{}\n")
    ModelMetadata(
        model_name="fraud_xgb",
        version=1,
        kind="xgboost",
        artifacts=artifacts,
        n_features=SPEC.n_features,
        threshold=0.5,
    ).save(path / METADATA_FILE)
    return path


def test_registers_the_model_and_descriptor_files_only(tmp_path: Path) -> None:
    path = _version_dir(tmp_path)
    # what `rtinfer models render` adds for the python backend is not a model artifact
    (path / "model.py").write_text("class TritonPythonModel: ...\n")
    (path / "__pycache__").mkdir()
    (path / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\xa7\r\r\n")
    names = [p.name for p in artifact_files(path)]
    assert names == sorted(
        ["model.onnx", "xgboost.json", FEATURE_SPEC_FILE, TRAINING_STATS_FILE, METADATA_FILE]
    )


@pytest.mark.parametrize("name", ["model.pkl", "model.pickle", "model.joblib", "weights.pt"])
def test_pickle_formats_are_refused_by_name(tmp_path: Path, name: str) -> None:
    path = _version_dir(tmp_path)
    (path / name).write_bytes(b"not even a real pickle")
    with pytest.raises(ArtifactRefused, match="pickle-based format"):
        artifact_files(path)


def test_pickle_content_is_refused_under_any_name(tmp_path: Path) -> None:
    path = _version_dir(tmp_path)
    (path / "extra").mkdir()
    (path / "extra" / "weights.bin").write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    with pytest.raises(ArtifactRefused, match="pickle header"):
        artifact_files(path)


def test_mlflow_flavor_directory_is_refused(tmp_path: Path) -> None:
    path = _version_dir(tmp_path)
    (path / "MLmodel").write_text("flavors:\n  sklearn:\n    pickled_model: model.pkl\n")
    with pytest.raises(ArtifactRefused, match="MLflow model flavor"):
        artifact_files(path)


def test_declared_non_data_format_is_refused(tmp_path: Path) -> None:
    path = _version_dir(tmp_path, {"onnx": "model.onnx", "sklearn": "model.skops"})
    with pytest.raises(ArtifactRefused, match=r"sklearn='model\.skops'"):
        artifact_files(path)


def test_missing_declared_artifact_is_an_error(tmp_path: Path) -> None:
    path = _version_dir(tmp_path)
    (path / "xgboost.json").unlink()
    with pytest.raises(RegistryError, match=r"lacks xgboost\.json"):
        artifact_files(path)


def test_content_hash_depends_on_contents_not_location(tmp_path: Path) -> None:
    a = _version_dir(tmp_path / "a")
    b = tmp_path / "b" / "copy"
    shutil.copytree(a, b)
    assert content_hash(artifact_files(a)) == content_hash(artifact_files(b))
    (b / "model.onnx").write_bytes(b"\x08\x08onnx-graph2")
    assert content_hash(artifact_files(a)) != content_hash(artifact_files(b))


def test_content_hash_covers_descriptor_files(tmp_path: Path) -> None:
    path = _version_dir(tmp_path)
    before = content_hash(artifact_files(path))
    (path / TRAINING_STATS_FILE).write_text('{"prior": 0.1}\n')
    assert content_hash(artifact_files(path)) != before


def test_signature_lists_features_in_spec_order_as_float32() -> None:
    inputs = model_signature(SPEC).inputs
    assert inputs.input_names() == ["amount", "hour_of_day", "channel"]
    assert {str(t) for t in inputs.input_types()} == {"DataType.float"}
    (out,) = model_signature(SPEC).outputs.inputs
    assert out.name == "output__0" and out.shape == (-1, 2) and str(out.type) == "float32"
