"""Replay: re-score logged feature vectors and compare with what was served.

A version is scored offline with ONNX Runtime on its artifact (the same float32 graph Triton
runs on the CPU target), found in the model repository or, once unloaded and removed from
it, downloaded from the MLflow registry, which keeps every version. A blend version
(``fraud_xgb:1+fraud_nn:1``) scores each part and blends them with the configured weights,
as ``fraud_blend`` does. Degraded rows are skipped: a fallback model served them, not the
vector. A candidate directory (a version directory: ``model.onnx`` + ``metadata.json``) is
compared with the served answers: agreement of the labels and flips in each direction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.store.backend import Store, rows
from gateway.store.queries import WINDOW
from python_backend.blend import Blender
from python_backend.feature_spec import METADATA_FILE, ModelMetadata
from python_backend.onnx_runner import OnnxRunner

ONNX_FILE = "model.onnx"
BLEND_PART = "+"
#: version directory of (model, version), or None when neither repository nor registry has it
Locate = Callable[[str, str], Path | None]
#: class probabilities ``float32 [rows, 2]`` of float32 rows
Probabilities = Callable[[np.ndarray], np.ndarray]
#: (model, version, version directory) -> how that version scores
Runner = Callable[[str, str, Path], Probabilities]


class ReplayError(RuntimeError):
    """Nothing to replay, or no artifact for a version."""


@dataclass(frozen=True)
class Scorer:
    """Positive-class probability of float32 rows, and the decision threshold."""

    score: Callable[[np.ndarray], np.ndarray]
    threshold: float
    positive: str = "fraud"
    negative: str = "legit"

    def label(self, p: np.ndarray) -> list[str]:
        return [self.positive if v >= self.threshold else self.negative for v in p]


def onnx_runner(_model: str, _version: str, directory: Path) -> Probabilities:
    """ONNX Runtime on the version's ``model.onnx``, offline."""
    if not (directory / ONNX_FILE).is_file():
        raise ReplayError(f"{directory} has no {ONNX_FILE}")
    return OnnxRunner(directory / ONNX_FILE).run


def version_scorer(
    directory: Path, run: Runner = onnx_runner, model: str = "", version: str = ""
) -> Scorer:
    """A version directory's scorer (``model.onnx``, ``metadata.json``)."""
    probabilities = run(model, version, directory)
    meta = ModelMetadata.load(directory / METADATA_FILE)
    return Scorer(lambda x: probabilities(x)[:, 1], meta.threshold, *reversed(meta.class_names))


def served_scorer(
    model_version: str,
    model_name: str,
    locate: Locate,
    blend_weights: Mapping[str, float],
    run: Runner = onnx_runner,
) -> Scorer:
    """The scorer of a logged ``model_version``: one model's, or a blend of several."""
    parts = [p.partition(":") for p in model_version.split(BLEND_PART)]
    if len(parts) == 1:
        directory = _located(locate, model_name, model_version)
        return version_scorer(directory, run, model_name, model_version)
    names = [name for name, _, _ in parts]
    missing = [n for n in names if n not in blend_weights]
    if missing:
        raise ReplayError(f"no blend weight for {missing} (postprocess.blend_weights)")
    dirs = [_located(locate, name, v) for name, _, v in parts]
    runners = [run(name, v, d) for (name, _, v), d in zip(parts, dirs, strict=True)]
    metas = [ModelMetadata.load(d / METADATA_FILE) for d in dirs]
    blender = Blender([blend_weights[n] for n in names])
    total = sum(blend_weights[n] for n in names)
    threshold = sum(blend_weights[n] * m.threshold for n, m in zip(names, metas, strict=True))
    return Scorer(lambda x: blender.blend([r(x) for r in runners])[:, 1], threshold / total)


def _located(locate: Locate, model: str, version: str) -> Path:
    found = locate(model, version)
    if found is None:
        raise ReplayError(
            f"{model} version {version}: not in the model repository nor in the registry"
        )
    return found


def logged_rows(
    store: Store,
    *,
    request_ids: Sequence[str] = (),
    model: str | None = None,
    since_s: int | None = None,
    limit: int = 100_000,
) -> list[dict[str, Any]]:
    """The served (non-shadow, non-degraded) rows to replay, oldest first."""
    where = ["arm != 'shadow'", "NOT is_degraded", "prediction IS NOT NULL", "length(features) > 0"]
    params: dict[str, Any] = {"limit": limit}
    if request_ids:
        where.append("has({ids:Array(String)}, request_id)")
        params["ids"] = list(request_ids)
    if model is not None:
        where.append("model_name = {model:String}")
        params["model"] = model
    if since_s is not None:
        where.append(WINDOW)
        params["since"] = since_s
    sql = (
        "SELECT request_id, ts, model_name, model_version, arm, features, prediction, "
        f"label_class FROM predictions FINAL WHERE {' AND '.join(where)} "
        "ORDER BY ts LIMIT {limit:UInt32}"
    )
    return rows(store, sql, params)


def replay(
    logged: list[dict[str, Any]], scorer_of: Callable[[dict[str, Any]], Scorer]
) -> dict[str, Any]:
    """Each row's logged and replayed score with |Δ|, and the labels' agreement."""
    if not logged:
        raise ReplayError("no stored rows match (degraded and shadow rows are not replayed)")
    out: list[dict[str, Any]] = []
    groups: dict[int, tuple[Scorer, list[dict[str, Any]]]] = {}
    for row in logged:
        scorer = scorer_of(row)
        groups.setdefault(id(scorer), (scorer, []))[1].append(row)
    for scorer, group in groups.values():
        x = np.asarray([r["features"] for r in group], dtype=np.float32)
        replayed = np.asarray(scorer.score(x), dtype=np.float64)
        for r, p, label in zip(group, replayed, scorer.label(replayed), strict=True):
            out.append(
                {
                    "request_id": r["request_id"],
                    "model_version": r["model_version"],
                    "logged": r["prediction"],
                    "replayed": float(p),
                    "abs_delta": abs(float(p) - r["prediction"]),
                    "served_label": r["label_class"],
                    "replayed_label": label,
                }
            )
    return {"rows": out, "summary": summarize(out)}


def summarize(out: list[dict[str, Any]]) -> dict[str, Any]:
    deltas = np.asarray([r["abs_delta"] for r in out])
    served = np.asarray([r["served_label"] for r in out])
    again = np.asarray([r["replayed_label"] for r in out])
    positive = "fraud"
    return {
        "rows": len(out),
        "max_abs_delta": float(deltas.max()),
        "mean_abs_delta": float(deltas.mean()),
        "agreement": float(np.mean(served == again)),
        "flips_to_positive": int(np.sum((served != positive) & (again == positive))),
        "flips_to_negative": int(np.sum((served == positive) & (again != positive))),
        "flip_rate": float(np.mean(served != again)),
    }
