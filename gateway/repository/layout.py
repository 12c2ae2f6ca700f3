"""The Triton model repository on disk: which models, versions and pipelines it holds.

Scorers keep their versions in ``<model>/<N>/`` with a ``serving.json`` naming the champion and
the pinned versions; each scorer has its own pipeline (postprocess + ensemble), and a pinned
version gets a copy of it named ``<name>__v<N>``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.settings import REPO_ROOT, Target
from python_backend.feature_spec import (
    FEATURE_SPEC_FILE,
    METADATA_FILE,
    TRAINING_STATS_FILE,
    FeatureSpec,
    ModelMetadata,
    TrainingStats,
)

ENSEMBLES_DIR = REPO_ROOT / "ensembles"


SHELLS_DIR = REPO_ROOT / "python_backend" / "triton_models"


SCORERS = ("fraud_xgb", "fraud_nn", "fraud_context_lr")


CONTEXT_DIM = 10


class RenderError(RuntimeError):
    """The repository cannot be rendered (missing or inconsistent artifacts)."""


@dataclass(frozen=True)
class Pipeline:
    """An ensemble and the model whose probabilities its postprocess step turns into labels."""

    ensemble: str
    postprocess: str
    scorers: tuple[str, ...]


PIPELINES = (
    Pipeline("fraud_xgb_pipeline", "fraud_xgb_postprocess", ("fraud_xgb",)),
    Pipeline("fraud_nn_pipeline", "fraud_nn_postprocess", ("fraud_nn",)),
    Pipeline("fraud_blend_pipeline", "fraud_blend_postprocess", ("fraud_xgb", "fraud_nn")),
)


#: per scoring model: which versions Triton serves (written by the lifecycle's swap procedure)
SERVING_FILE = "serving.json"


#: suffix of a pipeline pinned to one scorer version: fraud_xgb_pipeline__v2
PINNED_SEPARATOR = "__v"


def pinned_name(name: str, version: int) -> str:
    """Name of the copy of ``name`` (ensemble or postprocess) pinned to a scorer version."""
    return f"{name}{PINNED_SEPARATOR}{version}"


def own_pipeline(model: str) -> Pipeline:
    """The pipeline that serves scoring model ``model`` alone (fraud_xgb -> fraud_xgb_pipeline)."""
    for pipe in PIPELINES:
        if pipe.scorers == (model,):
            return pipe
    raise RenderError(
        f"{model} has no pipeline of its own; known: {[p.ensemble for p in PIPELINES]}"
    )


@dataclass(frozen=True)
class Serving:
    """What Triton serves of one scoring model, kept in ``<repository>/<model>/serving.json``.

    ``versions`` are loaded (the scorer's version policy); ``champion`` answers through the
    unversioned names (``fraud_xgb_pipeline``, ``fraud_blend_pipeline``); each version in
    ``pinned`` also has its own pipeline ``<model>_pipeline__v<N>``, which the catalog routes
    to. Without the file the newest version directory is the champion, with no pinned pipeline.
    """

    champion: int
    versions: tuple[int, ...]
    pinned: tuple[int, ...] = ()

    @classmethod
    def load(cls, repository: Path, model: str) -> Serving:
        path = repository / model / SERVING_FILE
        if not path.is_file():
            newest = latest_version(repository / model)
            return cls(newest, (newest,))
        try:
            raw = json.loads(path.read_text())
            serving = cls(
                int(raw["champion"]),
                tuple(sorted({int(v) for v in raw["versions"]})),
                tuple(sorted({int(v) for v in raw.get("pinned", ())})),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RenderError(f"{path} is not a valid serving file: {exc}") from exc
        if serving.champion not in serving.versions or not set(serving.pinned) <= set(
            serving.versions
        ):
            raise RenderError(f"{path}: champion and pinned versions must be among versions")
        return serving

    def save(self, repository: Path, model: str) -> None:
        """Write the file atomically (temp file, fsync, rename)."""
        path = repository / model / SERVING_FILE
        tmp = path.with_name(f".{SERVING_FILE}.tmp")
        body = {
            "champion": self.champion,
            "versions": sorted(set(self.versions)),
            "pinned": sorted(set(self.pinned)),
        }
        with tmp.open("w") as fh:
            fh.write(json.dumps(body) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)


def latest_version(model_dir: Path) -> int:
    if not model_dir.is_dir():
        raise RenderError(
            f"model {model_dir.name} not found in {model_dir.parent}; run `rtinfer models build`"
        )
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise RenderError(
            f"no numeric version directory in {model_dir}; run `rtinfer models build`"
        )
    return max(versions)


@dataclass(frozen=True)
class TrainedModel:
    name: str
    version: int
    path: Path
    metadata: ModelMetadata
    spec: FeatureSpec
    stats: TrainingStats

    @classmethod
    def load(cls, repository: Path, name: str, version: int | None = None) -> TrainedModel:
        """Version ``version`` of ``name`` (default: its newest version directory)."""
        model_dir = repository / name
        if not model_dir.is_dir():
            raise RenderError(f"model {name} not found in {repository}; run `rtinfer models build`")
        if version is None:
            version = latest_version(model_dir)
        path = model_dir / str(version)
        try:
            return cls(
                name=name,
                version=version,
                path=path,
                metadata=ModelMetadata.load(path / METADATA_FILE),
                spec=FeatureSpec.load(path / FEATURE_SPEC_FILE),
                stats=TrainingStats.load(path / TRAINING_STATS_FILE),
            )
        except (OSError, ValueError) as exc:
            raise RenderError(f"{name} version {version} is incomplete: {exc}") from exc


def write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / "config.pbtxt.tmp"
    tmp.write_text(text_format.MessageToString(config))
    tmp.replace(model_dir / "config.pbtxt")


def _place_shell(version_dir: Path, shell: str | None) -> None:
    """Put (or, for non-python backends, remove) the python-backend ``model.py``."""
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / "model.py"
    if shell is None:
        target.unlink(missing_ok=True)
        return
    shutil.copyfile(SHELLS_DIR / shell / "model.py", target)


def place_scorer_shell(version_dir: Path, target: Target) -> None:
    """Put the scorer's python-backend shell into ``version_dir`` (``cpu``), or remove it."""
    _place_shell(version_dir, "onnx_runner" if target == "cpu" else None)


def served_models(repository: Path) -> list[str]:
    """The models Triton loads for ``repository`` as rendered, in load order: the scorers,
    the assembler, the blend, each pipeline (postprocess before its ensemble), then the
    pipelines pinned in each scorer's ``serving.json``."""
    models = [*SCORERS, "feature_assembler", "fraud_blend"]
    for pipe in PIPELINES:
        models += [pipe.postprocess, pipe.ensemble]
    for name in SCORERS:
        serving = Serving.load(repository, name)
        if not serving.pinned:
            continue
        pipe = own_pipeline(name)
        for version in serving.pinned:
            models += [pinned_name(pipe.postprocess, version), pinned_name(pipe.ensemble, version)]
    return models
