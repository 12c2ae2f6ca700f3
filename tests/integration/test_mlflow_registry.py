"""Registering the demo models in the stack's real MLflow server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.models import Model
from typer.testing import CliRunner

from python_backend.feature_spec import FEATURE_SPEC_FILE, FeatureSpec
from rtinfer import stack
from rtinfer.cli import app
from rtinfer.registry import (
    CONTENT_HASH_TAG,
    DEMO_MODELS,
    FEATURE_SPEC_HASH_TAG,
    ArtifactRefused,
    Registered,
    artifact_files,
    register_repository,
    register_version,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tracking_uri(running_stack: stack.StackState) -> str:
    assert running_stack.mlflow_uri is not None
    return running_stack.mlflow_uri


@pytest.fixture(scope="module")
def client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@pytest.fixture(scope="module")
def registered(tracking_uri: str, built_repository: Path) -> list[Registered]:
    return register_repository(tracking_uri, built_repository)


def _versions(client: MlflowClient, name: str) -> list[str]:
    return sorted(mv.version for mv in client.search_model_versions(f"name = '{name}'"))


def test_demo_models_register_and_download_byte_identical(
    registered: list[Registered],
    client: MlflowClient,
    tracking_uri: str,
    built_repository: Path,
    tmp_path: Path,
) -> None:
    assert [r.name for r in registered] == list(DEMO_MODELS)
    assert all(r.created for r in registered)
    for reg in registered:
        mv = client.get_model_version(reg.name, reg.version)
        assert mv.source == reg.source and mv.run_id == reg.run_id
        assert mv.tags[CONTENT_HASH_TAG] == reg.content_sha256
        version_dir = built_repository / reg.name / "1"
        spec_hash = client.get_run(reg.run_id).data.tags[FEATURE_SPEC_HASH_TAG]
        assert mv.tags[FEATURE_SPEC_HASH_TAG] == spec_hash
        local = download_artifacts(
            artifact_uri=mv.source, dst_path=str(tmp_path / reg.name), tracking_uri=tracking_uri
        )
        for original in artifact_files(version_dir):
            assert (Path(local) / original.name).read_bytes() == original.read_bytes()
        spec = FeatureSpec.load(version_dir / FEATURE_SPEC_FILE)
        signature = Model.load(Path(local) / "MLmodel").signature
        assert signature is not None and signature.inputs.input_names() == spec.names
        assert not Model.load(Path(local) / "MLmodel").flavors  # nothing loadable by pickle
    run = client.get_run(registered[0].run_id)
    assert run.data.metrics["auc"] > 0.5 and run.data.params["kind"] == "xgboost"


def test_registering_again_is_a_no_op(
    registered: list[Registered],
    client: MlflowClient,
    tracking_uri: str,
    built_repository: Path,
) -> None:
    before = {name: _versions(client, name) for name in DEMO_MODELS}
    again = register_repository(tracking_uri, built_repository)
    assert [(r.name, r.version, r.created) for r in again] == [
        (r.name, r.version, False) for r in registered
    ]
    assert {name: _versions(client, name) for name in DEMO_MODELS} == before
    # the CLI takes the same path
    result = CliRunner().invoke(
        app,
        [
            "models",
            "register",
            "--tracking-uri",
            tracking_uri,
            "--repository",
            str(built_repository),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("already registered") == len(DEMO_MODELS)


def test_a_pickle_in_the_version_dir_is_refused(
    registered: list[Registered],
    client: MlflowClient,
    tracking_uri: str,
    built_repository: Path,
    tmp_path: Path,
) -> None:
    version_dir = tmp_path / "fraud_xgb" / "2"
    shutil.copytree(built_repository / "fraud_xgb" / "1", version_dir)
    (version_dir / "model.pkl").write_bytes(b"\x80\x05K\x01.")
    before = _versions(client, "fraud_xgb")
    with pytest.raises(ArtifactRefused, match=r"model\.pkl is a pickle-based format"):
        register_version(tracking_uri, version_dir, "fraud_xgb")
    assert _versions(client, "fraud_xgb") == before
    result = CliRunner().invoke(
        app, ["models", "register", "--tracking-uri", tracking_uri, "--repository", str(tmp_path)]
    )
    assert result.exit_code == 1 and "pickle-based format" in result.output
