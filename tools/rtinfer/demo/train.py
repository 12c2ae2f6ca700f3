"""Train the three demo fraud models and write them as a Triton model repository.

Every model version directory holds the artifact (ONNX, plus XGBoost JSON for the FIL
backend), ``feature_spec.json``, ``training_stats.json`` and ``metadata.json``. No pickles.
All ONNX graphs share one tensor interface: input ``input__0`` FP32 ``[batch, n_features]``,
output ``output__0`` FP32 ``[batch, 2]`` holding ``[P(legit), P(fraud)]``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import xgboost as xgb
from onnx import TensorProto, helper
from onnxmltools import convert_xgboost
from onnxmltools.convert.common.data_types import FloatTensorType as XgbFloatTensorType
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, log_loss, precision_recall_curve, roc_auc_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from python_backend.feature_spec import (
    FEATURE_SPEC_FILE,
    METADATA_FILE,
    TRAINING_STATS_FILE,
    FeatureSpec,
    GoldenExample,
    ModelMetadata,
)
from rtinfer.demo.dataset import (
    build_feature_spec,
    compute_training_stats,
    feature_names,
    generate_entities,
    generate_transactions,
)

logger = logging.getLogger(__name__)

#: how fraud_nn is trained: scikit-learn + skl2onnx, or PyTorch + torch.onnx.export (optional)
NnFramework = Literal["sklearn", "torch"]

XGB_MODEL = "fraud_xgb"
NN_MODEL = "fraud_nn"
CONTEXT_LR_MODEL = "fraud_context_lr"

INPUT_NAME = "input__0"
OUTPUT_NAME = "output__0"
ONNX_FILE = "model.onnx"
#: Class-probability output of the onnxmltools / skl2onnx classifier converters (no ZipMap).
CONVERTER_PROBABILITIES = "probabilities"
#: File name the Triton FIL backend loads for ``model_type: xgboost_json``.
XGBOOST_FILE = "xgboost.json"
#: Highest ai.onnx opset onnxmltools converts XGBoost to; used for every model.
ONNX_OPSET = 15
#: Max |P(fraud)| difference allowed between an ONNX graph and the model it came from.
XGB_TOLERANCE = 1e-5
SKLEARN_TOLERANCE = 1e-4
N_GOLDEN = 8


@dataclass(frozen=True)
class Splits:
    """Fixed train / validation / test split (70 / 15 / 15 by row order)."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray

    def columns(self, idx: list[int]) -> Splits:
        """The same split restricted to feature columns ``idx``."""
        return Splits(
            X_train=self.X_train[:, idx],
            y_train=self.y_train,
            X_val=self.X_val[:, idx],
            y_val=self.y_val,
            X_test=self.X_test[:, idx],
            y_test=self.y_test,
        )


def split_data(X: np.ndarray, y: np.ndarray) -> Splits:
    """Split rows 70/15/15; rows are independent draws, so order is already random."""
    a, b = int(0.70 * len(y)), int(0.85 * len(y))
    return Splits(X[:a], y[:a], X[a:b], y[a:b], X[b:], y[b:])


def load_onnx_session(model: str | Path | bytes) -> ort.InferenceSession:
    """A CPU ONNX Runtime session on one thread (a file path or serialized model bytes).

    One thread keeps tree-ensemble sums in a fixed order, so outputs are reproducible.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def predict_fraud(session: ort.InferenceSession, X: np.ndarray) -> np.ndarray:
    """P(fraud) per row from a session with the demo tensor interface."""
    (probabilities,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(X)})
    return probabilities[:, 1]


def _prune_unused_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs feed no graph output (e.g. the label branch)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used = {name for node in graph.node for name in node.input}
    kept_init = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_init)


def _normalize_opsets(model: onnx.ModelProto) -> None:
    """One entry per domain (highest version), sorted: converters emit them in set order."""
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        versions[opset.domain] = max(opset.version, versions.get(opset.domain, 0))
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(versions.items()))


def finalize_onnx(model: onnx.ModelProto, n_features: int, name: str) -> onnx.ModelProto:
    """Keep only the class-probability output, named ``output__0``, and validate the graph.

    Converters emit ``label`` and ``probabilities``; serving reads only the probabilities.
    Graph name and opset order are fixed so that a rebuild gives the same bytes.
    """
    graph = model.graph
    graph.name = name
    _normalize_opsets(model)
    outputs = [o.name for o in graph.output]
    if CONVERTER_PROBABILITIES not in outputs:
        raise ValueError(f"no {CONVERTER_PROBABILITIES!r} among the graph outputs {outputs}")
    for node in graph.node:
        for names in (node.output, node.input):
            for i, tensor in enumerate(names):
                if tensor == CONVERTER_PROBABILITIES:
                    names[i] = OUTPUT_NAME
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, 2]))
    inputs = [i.name for i in graph.input]
    if inputs != [INPUT_NAME]:
        raise ValueError(f"expected the single input {INPUT_NAME!r}, got {inputs}")
    del graph.input[:]
    graph.input.append(
        helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, n_features])
    )
    _prune_unused_nodes(graph)
    onnx.checker.check_model(model, full_check=True)
    return model


def _check_agreement(expected: np.ndarray, actual: np.ndarray, tolerance: float, what: str) -> None:
    diff = float(np.max(np.abs(expected.astype(np.float64) - actual.astype(np.float64))))
    if diff > tolerance:
        raise RuntimeError(f"{what}: ONNX P(fraud) differs by {diff:.3g} > {tolerance:g}")
    logger.info("%s: ONNX agrees with the trained model (max diff %.3g)", what, diff)


def _train_xgb(splits: Splits, seed: int) -> xgb.XGBClassifier:
    clf = xgb.XGBClassifier(
        n_estimators=200,
        max_depth=6,
        learning_rate=0.1,
        n_jobs=2,
        random_state=seed,
        tree_method="hist",
    )
    return clf.fit(splits.X_train, splits.y_train)


def portable_booster_json(raw: bytes) -> bytes:
    """XGBoost JSON that older readers (Treelite in Triton's FIL backend) also parse.

    XGBoost 3 writes a single-target ``base_score`` as a vector string (``"[3.4E-2]"``);
    XGBoost 2 and the Treelite versions shipped in Triton containers expect a scalar string.
    Both forms load into XGBoost 3 with identical predictions (checked by the caller).
    """
    doc = json.loads(raw)
    params = doc["learner"]["learner_model_param"]
    base = str(params.get("base_score", ""))
    if base.startswith("[") and base.endswith("]") and "," not in base:
        params["base_score"] = base[1:-1]
    return json.dumps(doc, separators=(",", ":")).encode()


def _export_xgb(clf: xgb.XGBClassifier, splits: Splits) -> dict[str, bytes]:
    n_features = splits.X_train.shape[1]
    booster_json = portable_booster_json(bytes(clf.get_booster().save_raw(raw_format="json")))
    reloaded = xgb.Booster(model_file=bytearray(booster_json))
    expected = clf.predict_proba(splits.X_test)[:, 1]
    if not np.array_equal(reloaded.inplace_predict(splits.X_test), expected):
        raise RuntimeError(f"{XGBOOST_FILE} does not reproduce the trained booster")
    model = convert_xgboost(
        clf,
        initial_types=[(INPUT_NAME, XgbFloatTensorType([None, n_features]))],
        target_opset=ONNX_OPSET,
    )
    model = finalize_onnx(model, n_features, XGB_MODEL)
    session = load_onnx_session(model.SerializeToString())
    _check_agreement(expected, predict_fraud(session, splits.X_test), XGB_TOLERANCE, XGB_MODEL)
    return {XGBOOST_FILE: booster_json, ONNX_FILE: model.SerializeToString()}


def _train_mlp(splits: Splits, seed: int) -> Pipeline:
    mlp = MLPClassifier(
        hidden_layer_sizes=(64, 32),
        activation="relu",
        batch_size=256,
        learning_rate_init=1e-3,
        max_iter=40,
        early_stopping=True,
        n_iter_no_change=10,
        random_state=seed,
    )
    pipe = Pipeline([("scale", StandardScaler()), ("mlp", mlp)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return pipe.fit(splits.X_train, splits.y_train)


def _train_context_lr(splits: Splits, seed: int) -> Pipeline:
    lr = LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
    pipe = Pipeline([("scale", StandardScaler()), ("lr", lr)])
    return pipe.fit(splits.X_train, splits.y_train)


def _export_sklearn(pipe: Pipeline, splits: Splits, name: str) -> dict[str, bytes]:
    n_features = splits.X_train.shape[1]
    model = convert_sklearn(
        pipe,
        name=name,
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        options={id(pipe.steps[-1][1]): {"zipmap": False}},
        target_opset=ONNX_OPSET,
    )
    model = finalize_onnx(model, n_features, name)
    session = load_onnx_session(model.SerializeToString())
    expected = pipe.predict_proba(splits.X_test)[:, 1]
    _check_agreement(expected, predict_fraud(session, splits.X_test), SKLEARN_TOLERANCE, name)
    return {ONNX_FILE: model.SerializeToString()}


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The P(fraud) cut-off (predict fraud when ``p >= threshold``) with the highest F1."""
    precision, recall, thresholds = precision_recall_curve(y, p)
    denom = precision[:-1] + recall[:-1]
    f1 = np.divide(
        2 * precision[:-1] * recall[:-1], denom, out=np.zeros_like(denom), where=denom > 0
    )
    return float(np.clip(thresholds[int(np.argmax(f1))], 1e-6, 1 - 1e-6))


def _golden(X: np.ndarray, y: np.ndarray, p: np.ndarray) -> list[GoldenExample]:
    """The first N_GOLDEN/2 fraud and first N_GOLDEN/2 legit rows, in row order."""
    half = N_GOLDEN // 2
    rows = np.sort(np.concatenate([np.flatnonzero(y == 1)[:half], np.flatnonzero(y == 0)[:half]]))
    return [GoldenExample(inputs=X[i].tolist(), probability=float(p[i])) for i in rows.tolist()]


def _evaluate(
    name: str, kind: str, version: int, artifacts: dict[str, str], onnx_bytes: bytes, s: Splits
) -> ModelMetadata:
    """Threshold from validation, metrics and golden examples from test, all through ORT."""
    session = load_onnx_session(onnx_bytes)
    threshold = best_f1_threshold(s.y_val, predict_fraud(session, s.X_val))
    p_test = predict_fraud(session, s.X_test)
    metrics = {
        "auc": float(roc_auc_score(s.y_test, p_test)),
        "logloss": float(log_loss(s.y_test, p_test.astype(np.float64), labels=[0, 1])),
        "f1": float(f1_score(s.y_test, (p_test >= threshold).astype(np.int64))),
    }
    return ModelMetadata(
        model_name=name,
        version=version,
        kind=kind,
        artifacts=artifacts,
        n_features=s.X_train.shape[1],
        threshold=threshold,
        metrics=metrics,
        golden=_golden(s.X_test, s.y_test, p_test),
    )


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary sibling, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_version(
    version_dir: Path,
    blobs: dict[str, bytes],
    spec: FeatureSpec,
    splits: Splits,
    metadata: ModelMetadata,
) -> None:
    version_dir.mkdir(parents=True, exist_ok=True)
    for file_name, data in blobs.items():
        _write_atomic(version_dir / file_name, lambda p, data=data: p.write_bytes(data))
    stats = compute_training_stats(splits.X_train, splits.y_train, spec)
    _write_atomic(version_dir / FEATURE_SPEC_FILE, spec.save)
    _write_atomic(version_dir / TRAINING_STATS_FILE, stats.save)
    _write_atomic(version_dir / METADATA_FILE, metadata.save)


def _export_torch_mlp(splits: Splits, seed: int) -> dict[str, bytes]:
    from rtinfer.demo import torch_mlp

    model = torch_mlp.train_torch_mlp(splits.X_train, splits.y_train, seed)
    raw = torch_mlp.export_onnx(model, splits.X_train.shape[1], ONNX_OPSET)
    onnx_model = onnx.load_from_string(raw)
    onnx_model.graph.name = NN_MODEL
    _normalize_opsets(onnx_model)
    onnx.checker.check_model(onnx_model, full_check=True)
    blob = onnx_model.SerializeToString()
    expected = torch_mlp.predict(model, splits.X_test)
    _check_agreement(
        expected,
        predict_fraud(load_onnx_session(blob), splits.X_test),
        SKLEARN_TOLERANCE,
        f"{NN_MODEL} (torch)",
    )
    return {ONNX_FILE: blob}


def _train_and_export(
    name: str, splits: Splits, seed: int, nn_framework: NnFramework = "sklearn"
) -> dict[str, bytes]:
    """Artifact file name -> bytes for one demo model."""
    if name == XGB_MODEL:
        return _export_xgb(_train_xgb(splits, seed), splits)
    if name == NN_MODEL and nn_framework == "torch":
        return _export_torch_mlp(splits, seed)
    pipe = _train_mlp(splits, seed) if name == NN_MODEL else _train_context_lr(splits, seed)
    return _export_sklearn(pipe, splits, name)


def build_demo_models(
    repository: Path,
    seed: int = 7,
    n_rows: int = 60_000,
    version: int = 1,
    nn_framework: NnFramework = "sklearn",
    dataset: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Path]:
    """Train the demo models and write ``repository/<model>/<version>``: on data generated for
    ``seed``, or on ``dataset`` (X, y), e.g. served vectors exported from the prediction
    store, split 70/15/15 in row order (oldest rows train).

    Returns model name -> version directory. Raises if an exported ONNX graph does not
    reproduce the model it was converted from.
    """
    if nn_framework == "torch":
        from rtinfer.demo.torch_mlp import require_torch

        require_torch()  # fail before training anything
    started = time.perf_counter()
    if dataset is None:
        X, y, _, _ = generate_transactions(generate_entities(seed), seed, n_rows)
    else:
        X, y = dataset
    splits = split_data(X, y)
    spec = build_feature_spec(splits.X_train)
    context_splits = splits.columns(spec.indices("context"))
    context_spec = build_feature_spec(context_splits.X_train, feature_names("context"))
    plans = [
        (XGB_MODEL, "xgboost", spec, splits),
        (NN_MODEL, "mlp", spec, splits),
        (CONTEXT_LR_MODEL, "logistic_regression", context_spec, context_splits),
    ]
    out: dict[str, Path] = {}
    for name, kind, model_spec, model_splits in plans:
        t0 = time.perf_counter()
        blobs = _train_and_export(name, model_splits, seed, nn_framework)
        artifacts = {("onnx" if f == ONNX_FILE else "xgboost"): f for f in blobs}
        metadata = _evaluate(name, kind, version, artifacts, blobs[ONNX_FILE], model_splits)
        version_dir = repository / name / str(version)
        _write_version(version_dir, blobs, model_spec, model_splits, metadata)
        out[name] = version_dir
        logger.info(
            "built %s v%d in %.1fs: %s threshold=%.4f",
            name,
            version,
            time.perf_counter() - t0,
            metadata.metrics,
            metadata.threshold,
        )
    logger.info("demo models built in %.1fs into %s", time.perf_counter() - started, repository)
    return out
