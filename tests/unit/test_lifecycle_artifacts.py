"""A candidate model version is refused, with a message naming the problem, before it is served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from gateway.lifecycle.artifacts import ARTIFACT_FILES, copy_artifacts, validate_version_dir
from gateway.lifecycle.errors import ArtifactInvalid


@pytest.fixture()
def candidate(built_repository: Path, tmp_path: Path) -> Path:
    return copy_artifacts(built_repository / "fraud_xgb" / "1", tmp_path / "candidate")


@pytest.fixture()
def reference(built_repository: Path) -> Path:
    return built_repository / "fraud_xgb" / "1"


def _edit_json(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_built_version_is_valid(candidate: Path, reference: Path) -> None:
    report = validate_version_dir(candidate, "fraud_xgb", reference=reference)
    assert report.onnx_input.name == "input__0"
    assert report.onnx_input.shape == (None, 50)
    assert report.onnx_output.shape[1:] == (2,)
    assert report.golden_checked == len(report.metadata.golden) == 8
    assert report.golden_max_diff <= 1e-4
    assert set(report.files) == ARTIFACT_FILES


def test_corrupt_onnx_is_refused(candidate: Path) -> None:
    (candidate / "model.onnx").write_bytes(b"\x08\x07not a protobuf at all")
    with pytest.raises(ArtifactInvalid, match=r"model\.onnx does not load in ONNX Runtime"):
        validate_version_dir(candidate, "fraud_xgb")


def test_renamed_input_is_refused(candidate: Path, reference: Path) -> None:
    model = onnx.load(str(candidate / "model.onnx"))
    model.graph.input[0].name = "features"
    for node in model.graph.node:
        node.input[:] = ["features" if i == "input__0" else i for i in node.input]
    onnx.save(model, str(candidate / "model.onnx"))
    with pytest.raises(
        ArtifactInvalid, match=r"inputs are \['features'\], expected \['input__0'\]"
    ):
        validate_version_dir(candidate, "fraud_xgb", reference=reference)


def test_wrong_feature_count_is_refused(candidate: Path, built_repository: Path) -> None:
    # the 10-feature context model's graph in place of the 50-feature one
    shutil.copyfile(
        built_repository / "fraud_context_lr" / "1" / "model.onnx", candidate / "model.onnx"
    )
    with pytest.raises(ArtifactInvalid, match=r"shape \[None, 10\], expected \[batch, 50\]"):
        validate_version_dir(candidate, "fraud_xgb")


def test_xgboost_json_with_wrong_feature_count_is_refused(candidate: Path) -> None:
    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        doc["learner"]["learner_model_param"]["num_feature"] = "49"

    _edit_json(candidate / "xgboost.json", edit)
    with pytest.raises(ArtifactInvalid, match="num_feature is 49, the feature spec has 50"):
        validate_version_dir(candidate, "fraud_xgb")


@pytest.mark.parametrize("name", ["model.pkl", "model.joblib", "model.py", "weights.bin"])
def test_code_files_are_refused_by_name(candidate: Path, name: str) -> None:
    (candidate / name).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ArtifactInvalid, match=rf"{name}: \.\w+ files can run code"):
        validate_version_dir(candidate, "fraud_xgb")


def test_stray_and_executable_files_are_refused(candidate: Path) -> None:
    (candidate / "notes.txt").write_text("hi")
    with pytest.raises(ArtifactInvalid, match=r"notes\.txt: unexpected file"):
        validate_version_dir(candidate, "fraud_xgb")
    (candidate / "notes.txt").unlink()
    (candidate / "model.onnx").chmod(0o755)
    with pytest.raises(ArtifactInvalid, match=r"model\.onnx: executable files are not allowed"):
        validate_version_dir(candidate, "fraud_xgb")


def test_symlink_is_refused(candidate: Path, reference: Path) -> None:
    (candidate / "model.onnx").unlink()
    (candidate / "model.onnx").symlink_to(reference / "model.onnx")
    with pytest.raises(ArtifactInvalid, match="symlinks are not allowed"):
        validate_version_dir(candidate, "fraud_xgb")


def test_missing_or_malformed_metadata_is_refused(candidate: Path) -> None:
    (candidate / "metadata.json").unlink()
    with pytest.raises(ArtifactInvalid, match=r"metadata\.json is missing"):
        validate_version_dir(candidate, "fraud_xgb")
    (candidate / "metadata.json").write_text('{"model_name": "fraud_xgb", "version": 0}')
    with pytest.raises(ArtifactInvalid, match=r"metadata\.json is not well-formed: version"):
        validate_version_dir(candidate, "fraud_xgb")


def test_metadata_of_another_model_is_refused(candidate: Path) -> None:
    with pytest.raises(ArtifactInvalid, match="model_name is 'fraud_xgb', expected 'fraud_nn'"):
        validate_version_dir(candidate, "fraud_nn")


def test_golden_mismatch_is_refused(candidate: Path) -> None:
    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        doc["golden"][3]["probability"] += 0.01

    _edit_json(candidate / "metadata.json", edit)
    with pytest.raises(ArtifactInvalid, match=r"golden example 3 predicts .*tolerance"):
        validate_version_dir(candidate, "fraud_xgb")


def test_feature_order_must_match_the_served_version(
    candidate: Path, reference: Path, tmp_path: Path
) -> None:
    served = copy_artifacts(reference, tmp_path / "served")
    _edit_json(served / "feature_spec.json", lambda doc: doc["features"].reverse())
    with pytest.raises(ArtifactInvalid, match="features differ from the served version's"):
        validate_version_dir(candidate, "fraud_xgb", reference=served)
