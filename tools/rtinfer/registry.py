"""Register model version directories in MLflow (runs, artifacts, registered model versions).

Only data formats are registered: the model as ONNX (``model.onnx``) and/or XGBoost JSON
(``xgboost.json``), with ``feature_spec.json``, ``training_stats.json`` and ``metadata.json``.
A version directory holding a pickle (``*.pkl``, ``*.pickle``, ``*.joblib``, ``*.dill``,
``*.pt``, ``*.pth``, or any file starting with a pickle header) or an MLflow model flavor
(``MLmodel``) is refused; other files (the python-backend ``model.py`` and ``__pycache__``
that ``rtinfer models render`` writes) are not uploaded. No MLflow model flavor is used, so
nothing registered here can be loaded through ``pickle``.

Each registration is one run in the ``rtinfer-models`` experiment: params and metrics from
``metadata.json``, the files under the run's ``model/`` artifact path next to a flavor-less
``MLmodel`` that carries the signature, and a registered model version whose source is that
artifact path. The signature describes the scoring model's own input, not the ensemble's:
one float32 column per feature in ``feature_spec.json`` order (the vector the ONNX input
``input__0`` takes, 50 features for fraud_xgb/fraud_nn, the context features for
fraud_context_lr), and the output ``output__0`` as a float32 ``[batch, 2]`` tensor of
``[P(legit), P(fraud)]``.

Registration is idempotent: the version is tagged with the SHA-256 of its files' contents,
and a directory whose hash is already a version of the registered model is not registered
again.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec
from pydantic import ValidationError

from gateway.lifecycle.artifacts import DESCRIPTOR_FILES, MODEL_FILES
from gateway.lifecycle.mlflow_registry import MLMODEL_FILE
from python_backend.feature_spec import (
    FEATURE_SPEC_FILE,
    METADATA_FILE,
    FeatureSpec,
    ModelMetadata,
)

log = logging.getLogger(__name__)

#: the demo models, registered under the same names
DEMO_MODELS = ("fraud_xgb", "fraud_nn", "fraud_context_lr")
EXPERIMENT = "rtinfer-models"
#: artifact path of the files inside the run
ARTIFACT_PATH = "model"
#: formats that execute code when loaded (pickle and its wrappers), or MLflow flavor dirs
REFUSED_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib", ".dill", ".pt", ".pth"})
#: protocol 2+ pickles start with the PROTO opcode and the protocol number
PICKLE_HEADERS = tuple(bytes([0x80, p]) for p in range(2, 6))

CONTENT_HASH_TAG = "rtinfer.content_sha256"
FEATURE_SPEC_HASH_TAG = "rtinfer.feature_spec_sha256"
SOURCE_VERSION_TAG = "rtinfer.source_version"


class RegistryError(RuntimeError):
    """A model version could not be registered."""


class ArtifactRefused(RegistryError):
    """The version directory holds a format that is not registered (e.g. a pickle)."""


@dataclass(frozen=True)
class Registered:
    """One registered model version (new, or found by its content hash)."""

    name: str
    version: str
    run_id: str
    source: str
    content_sha256: str
    created: bool


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refusal(path: Path) -> str | None:
    """Why ``path`` must not be registered, or None."""
    if path.name == MLMODEL_FILE:
        return "an MLflow model flavor (MLmodel); register the plain ONNX/XGBoost JSON files"
    if path.suffix.lower() in REFUSED_SUFFIXES:
        return f"a pickle-based format ({path.suffix})"
    with path.open("rb") as fh:
        if fh.read(2) in PICKLE_HEADERS:
            return "a pickle (its content starts with a pickle header)"
    return None


def artifact_files(version_dir: Path) -> list[Path]:
    """The files of ``version_dir`` to register, in name order; refuse pickles and flavors.

    Raises ``ArtifactRefused`` for a pickle-like file anywhere in the directory, for a
    model kind other than ONNX/XGBoost JSON in ``metadata.json``, or for a missing file.
    """
    if not version_dir.is_dir():
        raise RegistryError(f"{version_dir} is not a directory")
    for path in sorted(version_dir.rglob("*")):
        reason = _refusal(path) if path.is_file() else None
        if reason is not None:
            raise ArtifactRefused(
                f"{path} is {reason}; only ONNX (model.onnx) and XGBoost JSON (xgboost.json) "
                "models are registered"
            )
    try:
        metadata = ModelMetadata.load(version_dir / METADATA_FILE)
    except (OSError, ValidationError) as exc:
        raise RegistryError(f"cannot read {version_dir / METADATA_FILE}: {exc}") from exc
    names: list[str] = []
    for kind, file_name in metadata.artifacts.items():
        if MODEL_FILES.get(kind) != file_name:
            raise ArtifactRefused(
                f"{version_dir / METADATA_FILE} declares artifact {kind}={file_name!r}; "
                f"only {MODEL_FILES} are registered"
            )
        names.append(file_name)
    if not names:
        raise RegistryError(f"{version_dir / METADATA_FILE} declares no model artifact")
    files = [version_dir / n for n in sorted({*names, *DESCRIPTOR_FILES})]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise RegistryError(f"{version_dir} lacks {', '.join(missing)}")
    return files


def content_hash(files: list[Path]) -> str:
    """SHA-256 over the files' names and contents (independent of their directory)."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(f"{path.name}\0{_sha256(path)}\n".encode())
    return digest.hexdigest()


def model_signature(spec: FeatureSpec) -> ModelSignature:
    """One float32 column per feature in spec order in; ``[batch, 2]`` float32 out."""
    inputs = Schema([ColSpec("float", name) for name in spec.names])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, 2), "output__0")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _existing(client: MlflowClient, name: str, digest: str) -> Registered | None:
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get(CONTENT_HASH_TAG) == digest:
            return Registered(name, mv.version, mv.run_id, mv.source, digest, created=False)
    return None


def _experiment_id(client: MlflowClient) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(EXPERIMENT))
    except MlflowException:  # created concurrently
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="Demo fraud model (ONNX / XGBoost JSON), registered by rtinfer."
        )


def register_version(tracking_uri: str, model_dir: Path, name: str) -> Registered:
    """Register ``model_dir`` as a new version of ``name`` unless its content is registered.

    Logs a run with the files under ``model/``, params/metrics from ``metadata.json`` and the
    signature, then creates the model version with the run's ``model/`` path as its source.
    """
    files = artifact_files(model_dir)
    digest = content_hash(files)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = _existing(client, name, digest)
    if found is not None:
        log.info("%s: %s already registered as version %s", name, model_dir, found.version)
        return found
    metadata = ModelMetadata.load(model_dir / METADATA_FILE)
    spec = FeatureSpec.load(model_dir / FEATURE_SPEC_FILE)
    spec_hash = _sha256(model_dir / FEATURE_SPEC_FILE)
    run = client.create_run(
        _experiment_id(client),
        run_name=f"{name}-v{metadata.version}",
        tags={CONTENT_HASH_TAG: digest, FEATURE_SPEC_HASH_TAG: spec_hash},
    )
    run_id = run.info.run_id
    try:
        params = {
            "model_name": metadata.model_name,
            "source_version": metadata.version,
            "kind": metadata.kind,
            "artifacts": ",".join(sorted(metadata.artifacts)),
            "n_features": metadata.n_features,
            "threshold": metadata.threshold,
            "input_name": metadata.input_name,
            "output_name": metadata.output_name,
        }
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, 0, 0) for k, v in sorted(metadata.metrics.items())],
            params=[Param(k, str(v)) for k, v in params.items()],
        )
        with tempfile.TemporaryDirectory(prefix="rtinfer-register-") as staging:
            staged = Path(staging)
            for path in files:
                shutil.copyfile(path, staged / path.name)
            # flavor-less: records the signature without making the files loadable by MLflow
            Model(artifact_path=ARTIFACT_PATH, run_id=run_id, signature=model_signature(spec)).save(
                staged / MLMODEL_FILE
            )
            client.log_artifacts(run_id, str(staged), ARTIFACT_PATH)
        client.set_terminated(run_id)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    _ensure_registered_model(client, name)
    source = f"{run.info.artifact_uri}/{ARTIFACT_PATH}"
    mv = client.create_model_version(
        name,
        source,
        run_id=run_id,
        tags={
            CONTENT_HASH_TAG: digest,
            FEATURE_SPEC_HASH_TAG: spec_hash,
            SOURCE_VERSION_TAG: str(metadata.version),
        },
        description=f"{metadata.kind} from {model_dir}",
    )
    log.info("%s: registered %s as version %s (%s)", name, model_dir, mv.version, source)
    return Registered(name, mv.version, run_id, source, digest, created=True)


def version_dirs(repository: Path, names: tuple[str, ...] = DEMO_MODELS) -> dict[str, list[Path]]:
    """Numeric version directories of each model in ``repository``, oldest first.

    Models without a directory in ``repository`` are left out.
    """
    out: dict[str, list[Path]] = {}
    for name in names:
        model_dir = repository / name
        if not model_dir.is_dir():
            continue
        versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        out[name] = sorted(versions, key=lambda p: int(p.name))
    return out


def register_repository(
    tracking_uri: str, repository: Path, names: tuple[str, ...] = DEMO_MODELS
) -> list[Registered]:
    """Register every version directory of ``names`` found in ``repository``."""
    return [
        register_version(tracking_uri, version_dir, name)
        for name, dirs in version_dirs(repository, names).items()
        for version_dir in dirs
    ]
