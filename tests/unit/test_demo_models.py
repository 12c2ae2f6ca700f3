"""The demo fraud models: exported graphs, their sidecar files and the synthetic data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import xgboost as xgb
from onnx import TensorProto
from sklearn.metrics import roc_auc_score

from python_backend.feature_spec import (
    FEATURE_SPEC_FILE,
    METADATA_FILE,
    TRAINING_STATS_FILE,
    FeatureSpec,
    ModelMetadata,
    TrainingStats,
)
from rtinfer.demo.dataset import (
    entity_feature_rows,
    generate_entities,
    generate_transactions,
)
from rtinfer.demo.train import (
    CONTEXT_LR_MODEL,
    NN_MODEL,
    ONNX_FILE,
    XGB_MODEL,
    XGBOOST_FILE,
    Splits,
    build_demo_models,
    load_onnx_session,
    predict_fraud,
    split_data,
)

SEED = 7
N_ROWS = 20_000
CONTEXT_NAMES = [
    "amount",
    "hour_of_day",
    "day_of_week",
    "channel",
    "is_international",
    "card_present",
    "device_age_days",
    "ip_risk_score",
    "distance_from_home_km",
    "is_new_device",
]
N_FEATURES = {XGB_MODEL: 50, NN_MODEL: 50, CONTEXT_LR_MODEL: 10}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    dirs = build_demo_models(root, seed=SEED, n_rows=N_ROWS)
    assert set(dirs) == set(N_FEATURES)
    assert all(d == root / name / "1" for name, d in dirs.items())
    return root


@pytest.fixture(scope="module")
def splits() -> Splits:
    X, y, _, _ = generate_transactions(generate_entities(SEED), SEED, N_ROWS)
    return split_data(X, y)


def _test_rows(model: str, splits: Splits) -> np.ndarray:
    return splits.X_test[:, -10:] if model == CONTEXT_LR_MODEL else splits.X_test


def _fraud_probabilities(root: Path, model: str, X: np.ndarray) -> np.ndarray:
    return predict_fraud(load_onnx_session(root / model / "1" / ONNX_FILE), X)


def test_xgb_onnx_matches_xgboost_predict_proba(repository: Path, splits: Splits) -> None:
    clf = xgb.XGBClassifier()
    clf.load_model(repository / XGB_MODEL / "1" / XGBOOST_FILE)
    expected = clf.predict_proba(splits.X_test)[:, 1]
    actual = _fraud_probabilities(repository, XGB_MODEL, splits.X_test)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


def _dims(value_info: onnx.ValueInfoProto) -> list[int | None]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


@pytest.mark.parametrize("model", list(N_FEATURES))
def test_onnx_tensor_interface(repository: Path, splits: Splits, model: str) -> None:
    graph = onnx.load(repository / model / "1" / ONNX_FILE).graph
    assert [i.name for i in graph.input] == ["input__0"]
    assert [o.name for o in graph.output] == ["output__0"]
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert _dims(graph.input[0]) == [None, N_FEATURES[model]]
    assert _dims(graph.output[0]) == [None, 2]

    session = load_onnx_session(repository / model / "1" / ONNX_FILE)
    (out,) = session.run(None, {"input__0": _test_rows(model, splits)[:64]})
    assert out.dtype == np.float32 and out.shape == (64, 2)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_feature_spec_layout(repository: Path) -> None:
    spec = FeatureSpec.load(repository / XGB_MODEL / "1" / FEATURE_SPEC_FILE)
    assert spec.n_features == 50
    assert [f.group for f in spec.features] == ["user"] * 20 + ["merchant"] * 20 + ["context"] * 10
    assert spec.names[-10:] == CONTEXT_NAMES
    assert all(f.name.startswith("user_") for f in spec.group_features("user"))
    assert all(f.name.startswith("merchant_") for f in spec.group_features("merchant"))
    assert all(f.min <= f.default <= f.max and f.min < f.max for f in spec.features)
    assert spec.entity_keys == {"user": "user_id", "merchant": "merchant_id"}
    assert FeatureSpec.load(repository / NN_MODEL / "1" / FEATURE_SPEC_FILE) == spec

    context = FeatureSpec.load(repository / CONTEXT_LR_MODEL / "1" / FEATURE_SPEC_FILE)
    assert context.names == CONTEXT_NAMES
    assert context.features == spec.features[-10:]


def test_training_data_lies_in_spec_ranges(repository: Path, splits: Splits) -> None:
    spec = FeatureSpec.load(repository / XGB_MODEL / "1" / FEATURE_SPEC_FILE)
    lo = np.array([f.min for f in spec.features])
    hi = np.array([f.max for f in spec.features])
    rows = np.vstack([splits.X_train, splits.X_val, splits.X_test])
    assert np.all(rows >= lo) and np.all(rows <= hi)


@pytest.mark.parametrize("model", list(N_FEATURES))
def test_golden_examples_reproduce(repository: Path, model: str) -> None:
    metadata = ModelMetadata.load(repository / model / "1" / METADATA_FILE)
    assert metadata.model_name == model and metadata.n_features == N_FEATURES[model]
    assert len(metadata.golden) == 8
    X = np.array([g.inputs for g in metadata.golden], dtype=np.float32)
    expected = np.array([g.probability for g in metadata.golden])
    np.testing.assert_allclose(_fraud_probabilities(repository, model, X), expected, atol=1e-6)


def test_metadata_artifacts_exist(repository: Path) -> None:
    for model in N_FEATURES:
        metadata = ModelMetadata.load(repository / model / "1" / METADATA_FILE)
        assert 0.0 < metadata.threshold < 1.0
        assert set(metadata.metrics) == {"auc", "logloss", "f1"}
        for file_name in metadata.artifacts.values():
            assert (repository / model / "1" / file_name).is_file()
    xgb_meta = ModelMetadata.load(repository / XGB_MODEL / "1" / METADATA_FILE)
    assert xgb_meta.artifacts == {"xgboost": XGBOOST_FILE, "onnx": ONNX_FILE}


@pytest.mark.parametrize("model", [XGB_MODEL, NN_MODEL])
def test_full_feature_models_rank_fraud_well(repository: Path, splits: Splits, model: str) -> None:
    p = _fraud_probabilities(repository, model, splits.X_test)
    auc = roc_auc_score(splits.y_test, p)
    assert auc > 0.8
    metadata = ModelMetadata.load(repository / model / "1" / METADATA_FILE)
    assert metadata.metrics["auc"] == pytest.approx(auc)


def test_rebuild_with_same_seed_is_identical(
    repository: Path, splits: Splits, tmp_path: Path
) -> None:
    build_demo_models(tmp_path, seed=SEED, n_rows=N_ROWS)
    for model in N_FEATURES:
        X = _test_rows(model, splits)
        first = _fraud_probabilities(repository, model, X)
        second = _fraud_probabilities(tmp_path, model, X)
        np.testing.assert_array_equal(first, second)
    files = sorted(p.relative_to(repository) for p in repository.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in files:
        assert (repository / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


@pytest.mark.parametrize("model", list(N_FEATURES))
def test_training_stats(repository: Path, model: str) -> None:
    stats = TrainingStats.load(repository / model / "1" / TRAINING_STATS_FILE)
    spec = FeatureSpec.load(repository / model / "1" / FEATURE_SPEC_FILE)
    assert 0.01 < stats.class_prior < 0.1
    assert list(stats.features) == spec.names
    assert stats.n_rows == int(0.7 * N_ROWS)
    for feature in spec.features:
        fs = stats.features[feature.name]
        assert list(fs.quantiles) == ["0.01", "0.05", "0.25", "0.5", "0.75", "0.95", "0.99"]
        assert fs.min <= fs.quantiles["0.5"] <= fs.max
        assert fs.quantiles["0.5"] == pytest.approx(feature.default, rel=1e-6, abs=1e-6)
        assert len(fs.histogram_counts) == 20 and len(fs.histogram_edges) == 21
        assert sum(fs.histogram_counts) == stats.n_rows


def test_entity_feature_rows_round_trip_float32() -> None:
    entities = generate_entities(SEED, n_users=500, n_merchants=100)
    rows = list(entity_feature_rows(entities))
    users = [r for r in rows if r[0] == "user"]
    merchants = [r for r in rows if r[0] == "merchant"]
    assert [r[1] for r in users] == entities.user_ids
    assert [r[1] for r in merchants] == entities.merchant_ids
    assert users[0][1] == "u_000001" and merchants[-1][1] == "m_00100"
    for table, group in ((entities.user_features, users), (entities.merchant_features, merchants)):
        parsed = np.array(
            [[np.float32(float(v)) for v in values.values()] for _, _, values in group],
            dtype=np.float32,
        )
        np.testing.assert_array_equal(parsed, table)
        assert all(len(values) == 20 for _, _, values in group)


def test_entities_are_deterministic_and_plausible() -> None:
    a = generate_entities(SEED, n_users=1000, n_merchants=200)
    b = generate_entities(SEED, n_users=1000, n_merchants=200)
    np.testing.assert_array_equal(a.user_features, b.user_features)
    np.testing.assert_array_equal(a.merchant_features, b.merchant_features)
    assert a.user_features.dtype == np.float32 and a.user_features.shape == (1000, 20)
    assert a.merchant_features.dtype == np.float32 and a.merchant_features.shape == (200, 20)
    other = generate_entities(SEED + 1, n_users=1000, n_merchants=200)
    assert not np.array_equal(a.user_features, other.user_features)


def test_output_holds_only_json_and_onnx(repository: Path) -> None:
    files = [p for p in repository.rglob("*") if p.is_file()]
    assert files
    assert {p.suffix for p in files} <= {".json", ".onnx"}
    assert not [p for p in files if p.name.startswith(".")]


def test_xgboost_json_has_scalar_base_score_for_fil(repository: Path) -> None:
    """Treelite in Triton's FIL backend parses a scalar base_score string."""
    import json

    doc = json.loads((repository / "fraud_xgb" / "1" / "xgboost.json").read_text())
    base = doc["learner"]["learner_model_param"]["base_score"]
    assert 0.0 < float(base) < 1.0
