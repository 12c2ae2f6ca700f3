"""Validate a candidate model version directory before anything of it is served.

A version directory holds only data, never code: the model as ONNX (``model.onnx``) and, for
XGBoost, the booster as JSON (``xgboost.json``), plus ``feature_spec.json``,
``training_stats.json`` and ``metadata.json``. Pickles, joblib files, Python modules, shared
libraries, executables, symlinks and subdirectories are refused by name.

The ONNX graph must load in ONNX Runtime with the tensor interface serving needs (the one the
currently served version has, when it is given) and reproduce the golden examples of
``metadata.json``; an XGBoost JSON must parse, have the spec's feature count and agree with the
ONNX graph on the same examples (the ``ngc`` target serves it on FIL).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from gateway.lifecycle.errors import ArtifactInvalid
from python_backend.feature_spec import (
    FEATURE_SPEC_FILE,
    METADATA_FILE,
    TRAINING_STATS_FILE,
    FeatureSpec,
    ModelMetadata,
    TrainingStats,
)

ONNX_FILE = "model.onnx"
XGBOOST_FILE = "xgboost.json"
#: every file a version directory may hold
ARTIFACT_FILES = frozenset(
    {ONNX_FILE, XGBOOST_FILE, FEATURE_SPEC_FILE, TRAINING_STATS_FILE, METADATA_FILE}
)
#: metadata.json ``artifacts`` kind -> the only file name allowed for it
MODEL_FILES = {"onnx": ONNX_FILE, "xgboost": XGBOOST_FILE}
#: the descriptor files beside the model file (all required)
DESCRIPTOR_FILES = (FEATURE_SPEC_FILE, TRAINING_STATS_FILE, METADATA_FILE)
#: suffixes named in the refusal: formats that run code when loaded, or are code
CODE_SUFFIXES = frozenset(
    {".pkl", ".pickle", ".joblib", ".sav", ".pt", ".pth", ".bin", ".py", ".pyc", ".so", ".sh"}
)
T = TypeVar("T")

#: max |P(positive)| difference between a golden example's expectation and the artifact
GOLDEN_TOLERANCE = 1e-4


@dataclass(frozen=True)
class TensorSig:
    """Name, ONNX type and shape (``None`` for a free dimension) of a graph input or output."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class ArtifactReport:
    """What validation established about a version directory."""

    model: str
    path: Path
    metadata: ModelMetadata
    spec: FeatureSpec
    files: tuple[str, ...]
    onnx_input: TensorSig
    onnx_output: TensorSig
    golden_checked: int
    #: largest |P(positive)| difference on the golden examples (ONNX, and XGBoost if present)
    golden_max_diff: float


def validate_version_dir(
    path: Path,
    model: str,
    reference: Path | None = None,
    tolerance: float = GOLDEN_TOLERANCE,
) -> ArtifactReport:
    """Check the candidate ``path`` of ``model``; raise :class:`ArtifactInvalid` if it is unfit.

    ``reference`` is the directory of the version currently served for ``model``: the
    candidate must keep its ONNX tensor interface and its feature names in the same order.
    """
    if not path.is_dir():
        raise ArtifactInvalid(f"{path} is not a directory")
    files = check_files(path)
    metadata = _load(path, METADATA_FILE, ModelMetadata.load)
    spec = _load(path, FEATURE_SPEC_FILE, FeatureSpec.load)
    _load(path, TRAINING_STATS_FILE, TrainingStats.load)
    if metadata.model_name != model:
        raise ArtifactInvalid(
            f"{path / METADATA_FILE}: model_name is {metadata.model_name!r}, expected {model!r}"
        )
    if metadata.n_features != spec.n_features:
        raise ArtifactInvalid(
            f"{path / METADATA_FILE}: n_features is {metadata.n_features} but "
            f"{FEATURE_SPEC_FILE} lists {spec.n_features} features"
        )
    _check_declared_artifacts(path, metadata, files)
    session = _onnx_session(path / ONNX_FILE)
    onnx_in, onnx_out = _check_interface(path / ONNX_FILE, session, metadata)
    if reference is not None:
        _check_against_reference(path, spec, onnx_in, onnx_out, reference)
    if not metadata.golden:
        raise ArtifactInvalid(f"{path / METADATA_FILE}: no golden examples to check the model by")
    x, expected = _golden(path, metadata)
    diff = _max_diff(path / ONNX_FILE, _onnx_positive(session, metadata, x), expected, tolerance)
    if XGBOOST_FILE in files:
        _check_xgboost_json(path / XGBOOST_FILE, spec.n_features)
        diff = max(
            diff, _max_diff(path / XGBOOST_FILE, _xgb_positive(path, x), expected, tolerance)
        )
    return ArtifactReport(
        model=model,
        path=path,
        metadata=metadata,
        spec=spec,
        files=tuple(sorted(files)),
        onnx_input=onnx_in,
        onnx_output=onnx_out,
        golden_checked=len(expected),
        golden_max_diff=diff,
    )


def copy_artifacts(version_dir: Path, dest: Path) -> Path:
    """Copy the data files of ``version_dir`` (not its python-backend shell) into new ``dest``.

    Turns a version of the repository back into a candidate, e.g. to serve it again under a
    new version number.
    """
    dest.mkdir(parents=True)
    for name in sorted(ARTIFACT_FILES):
        if (version_dir / name).is_file():
            shutil.copyfile(version_dir / name, dest / name)
    return dest


def check_files(path: Path) -> set[str]:
    """Names of the files in ``path``; raise if anything there is not an allowed artifact."""
    names: set[str] = set()
    for entry in sorted(path.iterdir()):
        st = entry.lstat()
        if stat.S_ISLNK(st.st_mode):
            raise ArtifactInvalid(f"{entry}: symlinks are not allowed in a model version")
        if stat.S_ISDIR(st.st_mode):
            raise ArtifactInvalid(f"{entry}: subdirectories are not allowed in a model version")
        if entry.suffix.lower() in CODE_SUFFIXES:
            raise ArtifactInvalid(
                f"{entry}: {entry.suffix} files can run code when loaded; a model version "
                f"holds only {', '.join(sorted(ARTIFACT_FILES))}"
            )
        if entry.name not in ARTIFACT_FILES:
            raise ArtifactInvalid(
                f"{entry}: unexpected file; a model version holds only "
                f"{', '.join(sorted(ARTIFACT_FILES))}"
            )
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactInvalid(f"{entry}: not a regular file")
        if st.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
            raise ArtifactInvalid(f"{entry}: executable files are not allowed in a model version")
        names.add(entry.name)
    return names


def _load(path: Path, name: str, loader: Callable[[Path], T]) -> T:
    file = path / name
    if not file.is_file():
        raise ArtifactInvalid(f"{file} is missing")
    try:
        return loader(file)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise ArtifactInvalid(f"{file} is not well-formed: {problems}") from None
    except (OSError, ValueError) as exc:
        raise ArtifactInvalid(f"{file} cannot be read: {exc}") from None


def _check_declared_artifacts(path: Path, metadata: ModelMetadata, files: set[str]) -> None:
    for kind, name in metadata.artifacts.items():
        if MODEL_FILES.get(kind) != name:
            raise ArtifactInvalid(
                f"{path / METADATA_FILE}: artifact {kind}={name!r} is not allowed; "
                f"model files are {', '.join(f'{k}={v}' for k, v in MODEL_FILES.items())}"
            )
        if name not in files:
            raise ArtifactInvalid(f"{path / name} is declared in {METADATA_FILE} but missing")
    if "onnx" not in metadata.artifacts:
        raise ArtifactInvalid(f"{path / METADATA_FILE}: no onnx artifact (every target needs one)")
    if metadata.kind == "xgboost" and "xgboost" not in metadata.artifacts:
        raise ArtifactInvalid(f"{path / METADATA_FILE}: an xgboost model needs {XGBOOST_FILE}")


def _onnx_session(file: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(
            str(file), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise ArtifactInvalid(f"{file} does not load in ONNX Runtime: {exc}") from None


def _sig(arg: ort.NodeArg) -> TensorSig:
    return TensorSig(
        arg.name, arg.type, tuple(d if isinstance(d, int) else None for d in arg.shape)
    )


def onnx_interface(file: Path) -> tuple[list[TensorSig], list[TensorSig]]:
    """Inputs and outputs of the ONNX graph in ``file``."""
    session = _onnx_session(file)
    return [_sig(a) for a in session.get_inputs()], [_sig(a) for a in session.get_outputs()]


def _check_interface(
    file: Path, session: ort.InferenceSession, metadata: ModelMetadata
) -> tuple[TensorSig, TensorSig]:
    inputs = [_sig(a) for a in session.get_inputs()]
    outputs = [_sig(a) for a in session.get_outputs()]
    if [i.name for i in inputs] != [metadata.input_name]:
        raise ArtifactInvalid(
            f"{file}: inputs are {[i.name for i in inputs]}, expected [{metadata.input_name!r}]"
        )
    if [o.name for o in outputs] != [metadata.output_name]:
        raise ArtifactInvalid(
            f"{file}: outputs are {[o.name for o in outputs]}, expected [{metadata.output_name!r}]"
        )
    (inp,), (out,) = inputs, outputs
    if inp.dtype != "tensor(float)" or out.dtype != "tensor(float)":
        raise ArtifactInvalid(f"{file}: input and output must be float32, got {inp} and {out}")
    if len(inp.shape) != 2 or inp.shape[1] != metadata.n_features:
        raise ArtifactInvalid(
            f"{file}: input {inp.name} has shape {list(inp.shape)}, expected "
            f"[batch, {metadata.n_features}] (the feature spec's feature count)"
        )
    if len(out.shape) != 2 or out.shape[1] not in (2, None):
        raise ArtifactInvalid(
            f"{file}: output {out.name} has shape {list(out.shape)}, not [batch, 2]"
        )
    return inp, out


def _check_against_reference(
    path: Path, spec: FeatureSpec, onnx_in: TensorSig, onnx_out: TensorSig, reference: Path
) -> None:
    ref_inputs, ref_outputs = onnx_interface(reference / ONNX_FILE)
    for what, got, want in (
        ("inputs", [onnx_in], ref_inputs),
        ("outputs", [onnx_out], ref_outputs),
    ):
        if [(t.name, t.dtype, t.shape[1:]) for t in got] != [
            (t.name, t.dtype, t.shape[1:]) for t in want
        ]:
            raise ArtifactInvalid(
                f"{path / ONNX_FILE}: {what} {got} differ from the served version's {want} "
                f"({reference / ONNX_FILE})"
            )
    served = FeatureSpec.load(reference / FEATURE_SPEC_FILE)
    if spec.names != served.names:
        raise ArtifactInvalid(
            f"{path / FEATURE_SPEC_FILE}: features differ from the served version's "
            f"({len(spec.names)} vs {len(served.names)}; the feature assembler builds vectors "
            "in the served order)"
        )


def _golden(path: Path, metadata: ModelMetadata) -> tuple[np.ndarray, np.ndarray]:
    for i, ex in enumerate(metadata.golden):
        if len(ex.inputs) != metadata.n_features:
            raise ArtifactInvalid(
                f"{path / METADATA_FILE}: golden example {i} has {len(ex.inputs)} inputs, "
                f"expected {metadata.n_features}"
            )
    x = np.asarray([ex.inputs for ex in metadata.golden], dtype=np.float32)
    return x, np.asarray([ex.probability for ex in metadata.golden], dtype=np.float64)


def _onnx_positive(
    session: ort.InferenceSession, metadata: ModelMetadata, x: np.ndarray
) -> np.ndarray:
    try:
        (y,) = session.run([metadata.output_name], {metadata.input_name: x})
    except Exception as exc:
        raise ArtifactInvalid(f"ONNX Runtime failed on the golden examples: {exc}") from None
    y = np.asarray(y)
    if y.shape != (len(x), 2):
        raise ArtifactInvalid(f"output has shape {list(y.shape)} for {len(x)} rows, not [rows, 2]")
    return y[:, 1].astype(np.float64)


def _max_diff(file: Path, actual: np.ndarray, expected: np.ndarray, tolerance: float) -> float:
    diffs = np.abs(actual - expected)
    worst = int(np.argmax(diffs))
    if not np.all(np.isfinite(actual)) or diffs[worst] > tolerance:
        raise ArtifactInvalid(
            f"{file}: golden example {worst} predicts {actual[worst]:.6g}, metadata expects "
            f"{expected[worst]:.6g} (tolerance {tolerance:g})"
        )
    return float(diffs[worst])


def _check_xgboost_json(file: Path, n_features: int) -> None:
    try:
        doc = json.loads(file.read_bytes())
        num_feature = int(doc["learner"]["learner_model_param"]["num_feature"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactInvalid(f"{file} is not an XGBoost JSON model: {exc!r}") from None
    if num_feature != n_features:
        raise ArtifactInvalid(
            f"{file}: num_feature is {num_feature}, the feature spec has {n_features}"
        )


def _xgb_positive(path: Path, x: np.ndarray) -> np.ndarray:
    import xgboost as xgb  # only candidates with a booster pay the import

    try:
        booster = xgb.Booster(model_file=os.fspath(path / XGBOOST_FILE))
        return np.asarray(booster.inplace_predict(x), dtype=np.float64)
    except xgb.core.XGBoostError as exc:
        raise ArtifactInvalid(f"{path / XGBOOST_FILE} does not load in XGBoost: {exc}") from None
