"""A version appears in the model repository complete or not at all, and never overwrites."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.lifecycle import materialize
from gateway.lifecycle.artifacts import ARTIFACT_FILES, copy_artifacts
from gateway.lifecycle.errors import ArtifactInvalid, LifecycleError, VersionExists
from gateway.lifecycle.materialize import (
    materialize_version,
    remove_version,
    serve_versions,
)
from gateway.repository.render import render_repository
from gateway.settings import Settings


@pytest.fixture()
def repo(built_repository: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "repo"
    shutil.copytree(built_repository, dest)
    render_repository(dest, Settings(), "cpu")
    return dest


@pytest.fixture()
def candidate(built_repository: Path, tmp_path: Path) -> Path:
    return copy_artifacts(built_repository / "fraud_xgb" / "1", tmp_path / "candidate")


def _entries(model_dir: Path) -> set[str]:
    return {p.name for p in model_dir.iterdir() if p.is_dir()}


def test_materialized_version_is_complete(repo: Path, candidate: Path) -> None:
    report = materialize_version(candidate, repo, "fraud_xgb", 2, "cpu", reference_version=1)
    version = repo / "fraud_xgb" / "2"
    assert report.path == version
    assert report.golden_checked == 8
    assert {p.name for p in version.iterdir()} == ARTIFACT_FILES | {"model.py"}
    for name in ARTIFACT_FILES:
        assert (version / name).read_bytes() == (candidate / name).read_bytes()
    assert _entries(repo / "fraud_xgb") == {"1", "2"}  # no temporary directory left


def test_ngc_target_gets_no_python_shell(repo: Path, candidate: Path) -> None:
    materialize_version(candidate, repo, "fraud_xgb", 2, "ngc")
    assert not (repo / "fraud_xgb" / "2" / "model.py").exists()


def test_existing_version_is_never_overwritten(repo: Path, candidate: Path) -> None:
    before = (repo / "fraud_xgb" / "1" / "model.onnx").read_bytes()
    with pytest.raises(VersionExists, match="already exists"):
        materialize_version(candidate, repo, "fraud_xgb", 1, "cpu")
    assert (repo / "fraud_xgb" / "1" / "model.onnx").read_bytes() == before
    assert _entries(repo / "fraud_xgb") == {"1"}


def test_invalid_candidate_leaves_nothing_behind(repo: Path, candidate: Path) -> None:
    (candidate / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(ArtifactInvalid, match="does not load in ONNX Runtime"):
        materialize_version(candidate, repo, "fraud_xgb", 2, "cpu")
    assert _entries(repo / "fraud_xgb") == {"1"}


def test_pickle_is_refused_before_anything_is_copied(repo: Path, candidate: Path) -> None:
    (candidate / "model.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(ArtifactInvalid, match=r"model\.pkl"):
        materialize_version(candidate, repo, "fraud_xgb", 2, "cpu")
    assert _entries(repo / "fraud_xgb") == {"1"}
    with pytest.raises(ArtifactInvalid, match="is not a directory"):
        materialize_version(candidate / "missing", repo, "fraud_xgb", 2, "cpu")


def test_no_partial_version_is_visible_and_temp_dir_is_removed_on_failure(
    repo: Path, candidate: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, object] = {}

    def interrupted(path: Path, model: str, reference: Path | None = None) -> None:
        seen["tmp"] = path
        seen["copied"] = sorted(p.name for p in path.iterdir())
        seen["version_visible"] = (repo / "fraud_xgb" / "2").exists()
        raise OSError("disk full")

    monkeypatch.setattr(materialize, "validate_version_dir", interrupted)
    with pytest.raises(OSError, match="disk full"):
        materialize_version(candidate, repo, "fraud_xgb", 2, "cpu")
    tmp = seen["tmp"]
    assert isinstance(tmp, Path)
    assert tmp.parent == repo / "fraud_xgb" and tmp.name.startswith(".tmp-2-")
    assert seen["copied"] == sorted(ARTIFACT_FILES)
    assert seen["version_visible"] is False
    assert not tmp.exists()
    assert _entries(repo / "fraud_xgb") == {"1"}


def test_serve_versions_sets_the_version_policy(repo: Path, candidate: Path) -> None:
    materialize_version(candidate, repo, "fraud_xgb", 2, "cpu")
    serve_versions(repo, "fraud_xgb", [2, 1], Settings(), "cpu")
    config = text_format.Parse((repo / "fraud_xgb" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert list(config.version_policy.specific.versions) == [1, 2]
    assert config.backend == "python"
    assert [(i.name, list(i.dims)) for i in config.input] == [("input__0", [50])]
    with pytest.raises(LifecycleError, match=r"versions \[3\] are not in the repository"):
        serve_versions(repo, "fraud_xgb", [1, 3], Settings(), "cpu")


def test_remove_version(repo: Path, candidate: Path) -> None:
    materialize_version(candidate, repo, "fraud_xgb", 2, "cpu")
    remove_version(repo, "fraud_xgb", 2)
    assert _entries(repo / "fraud_xgb") == {"1"}
    remove_version(repo, "fraud_xgb", 2)  # already gone: nothing to do
