"""Smoke test of a loaded model version: its golden examples, through Triton, fast enough.

Ensembles reference their steps without a version (the newest loaded one answers), so the test
talks to the scoring model version itself (``fraud_xgb`` version N, the FP32 feature vector
in, class probabilities out). It checks every golden example of ``metadata.json`` - once as
a batch and once per row - against its expected positive-class probability, and that the
median single-row latency stays under a bound.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from gateway.lifecycle.errors import LifecycleError, SmokeTestFailed
from gateway.lifecycle.triton_repo import TritonRepository
from python_backend.contract import CONTEXT_FEATURES
from python_backend.feature_spec import ModelMetadata

#: max |P(positive)| difference from the golden expectation (Triton runs the same ONNX graph)
SMOKE_TOLERANCE = 1e-4
#: median single-row latency bound; a loaded CPU tree model answers in about a millisecond
P50_BOUND_MS = 50.0


@dataclass(frozen=True)
class SmokeReport:
    model: str
    version: int
    examples: int
    max_diff: float
    p50_ms: float
    max_ms: float


async def smoke_test(
    repo: TritonRepository,
    model: str,
    version: int,
    metadata: ModelMetadata,
    *,
    tolerance: float = SMOKE_TOLERANCE,
    p50_bound_ms: float = P50_BOUND_MS,
    rounds: int = 3,
) -> SmokeReport:
    """Score the golden examples with ``model`` version ``version``; raise if any is off."""
    if not metadata.golden:
        raise SmokeTestFailed(f"{model} version {version}: metadata has no golden examples")
    x = np.asarray([ex.inputs for ex in metadata.golden], dtype=np.float32)
    expected = np.asarray([ex.probability for ex in metadata.golden], dtype=np.float64)
    where = f"{model} version {version}"

    async def positive(rows: np.ndarray) -> np.ndarray:
        try:
            y = await repo.infer(model, version, metadata.input_name, metadata.output_name, rows)
        except LifecycleError as exc:
            raise SmokeTestFailed(f"{where}: inference failed: {exc.message}") from None
        if y.shape != (len(rows), 2):
            raise SmokeTestFailed(f"{where}: output shape {list(y.shape)}, not [{len(rows)}, 2]")
        return y[:, 1].astype(np.float64)

    worst = _check(where, await positive(x), expected, tolerance)
    latencies_ms: list[float] = []
    for _ in range(rounds):
        for i in range(len(x)):
            started = time.perf_counter()
            p = await positive(x[i : i + 1])
            latencies_ms.append((time.perf_counter() - started) * 1e3)
            worst = max(worst, _check(where, p, expected[i : i + 1], tolerance, offset=i))
    p50 = statistics.median(latencies_ms)
    if p50 > p50_bound_ms:
        raise SmokeTestFailed(
            f"{where}: median single-row latency {p50:.1f} ms exceeds {p50_bound_ms:g} ms"
        )
    return SmokeReport(model, version, len(x), worst, p50, max(latencies_ms))


def _check(
    where: str, actual: np.ndarray, expected: np.ndarray, tolerance: float, offset: int = 0
) -> float:
    diffs = np.abs(actual - expected)
    i = int(np.argmax(diffs))
    if not np.all(np.isfinite(actual)) or diffs[i] > tolerance:
        raise SmokeTestFailed(
            f"{where}: golden example {offset + i} scored {actual[i]:.6g}, expected "
            f"{expected[i]:.6g} (tolerance {tolerance:g})"
        )
    return float(diffs[i])


async def smoke_pipeline(
    repo: TritonRepository, ensemble: str, class_names: list[str] | tuple[str, ...], rows: int = 4
) -> None:
    """Send a few rows through the whole pipeline ``ensemble``; raise unless each answers with
    a probability in [0, 1] and one of ``class_names`` (entities need not exist: missing
    features are imputed)."""
    context = np.zeros((rows, len(CONTEXT_FEATURES)), dtype=np.float32)
    users = [f"smoke-user-{i}" for i in range(rows)]
    merchants = [f"smoke-merchant-{i}" for i in range(rows)]
    try:
        prediction, labels = await repo.infer_pipeline(ensemble, users, merchants, context)
    except LifecycleError as exc:
        raise SmokeTestFailed(f"{ensemble}: inference failed: {exc.message}") from None
    if prediction.shape != (rows,) or not np.all((prediction >= 0) & (prediction <= 1)):
        raise SmokeTestFailed(f"{ensemble}: predictions {prediction.tolist()} not in [0, 1]")
    unknown = sorted(set(labels) - set(class_names))
    if unknown:
        raise SmokeTestFailed(f"{ensemble}: labels {unknown} not among {list(class_names)}")
