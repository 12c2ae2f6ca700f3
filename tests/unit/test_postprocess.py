import numpy as np
import pytest

from python_backend.postprocess import Postprocessor, fallback_budget_us

CLASSES = ["legit", "fraud"]


def probs(*positive: float) -> np.ndarray:
    p = np.array(positive, dtype=np.float32)
    return np.stack([1.0 - p, p], axis=1)


def features(rows: int, width: int = 6) -> np.ndarray:
    return np.arange(rows * width, dtype=np.float32).reshape(rows, width)


class RecordingFallback:
    def __init__(self, positive: float = 0.9) -> None:
        self.calls: list[np.ndarray] = []
        self.positive = positive

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(x.copy())
        return probs(*([self.positive] * len(x)))


def test_threshold_label_and_confidence() -> None:
    post = Postprocessor(threshold=0.3, class_names=CLASSES, class_prior=0.02, fallback=None)
    out = post.process(probs(0.1, 0.3, 0.8), np.ones(3, bool), features(3), [])
    np.testing.assert_allclose(out.prediction, [0.1, 0.3, 0.8])
    assert out.prediction.dtype == np.float32
    assert out.label.tolist() == ["legit", "fraud", "fraud"]
    np.testing.assert_allclose(out.confidence, [0.9, 0.3, 0.8], rtol=1e-6)
    assert out.degraded.tolist() == [False, False, False]
    assert out.degraded_reason.tolist() == ["", "", ""]


def test_degraded_rows_are_rescored_by_one_fallback_call() -> None:
    fallback = RecordingFallback(positive=0.9)
    post = Postprocessor(0.5, CLASSES, 0.02, fallback=fallback, fallback_name="fraud_context_lr")
    ok = np.array([True, False, True, False])
    x = features(4)
    out = post.process(probs(0.1, 0.1, 0.7, 0.2), ok, x, [4, 5])
    assert len(fallback.calls) == 1
    np.testing.assert_array_equal(fallback.calls[0], x[[1, 3]][:, [4, 5]])
    np.testing.assert_allclose(out.prediction, [0.1, 0.9, 0.7, 0.9])
    assert out.label.tolist() == ["legit", "fraud", "fraud", "fraud"]
    assert out.degraded.tolist() == [False, True, False, True]
    assert out.degraded_reason.tolist() == [
        "",
        "feature_store_unavailable:fraud_context_lr",
        "",
        "feature_store_unavailable:fraud_context_lr",
    ]
    assert (post.stats.degraded_rows, post.stats.fallback_calls) == (2, 1)


def test_no_degraded_rows_no_fallback_call() -> None:
    fallback = RecordingFallback()
    post = Postprocessor(0.5, CLASSES, 0.02, fallback=fallback, fallback_name="lr")
    post.process(probs(0.1, 0.9), np.ones(2, bool), features(2), [0])
    assert fallback.calls == []


def test_failing_fallback_serves_the_class_prior() -> None:
    def broken(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("fraud_context_lr: model unavailable")

    post = Postprocessor(0.5, CLASSES, class_prior=0.02, fallback=broken, fallback_name="lr")
    out = post.process(probs(0.9, 0.9), np.array([False, True]), features(2), [0])
    np.testing.assert_allclose(out.prediction, [0.02, 0.9])
    assert out.label.tolist() == ["legit", "fraud"]
    np.testing.assert_allclose(out.confidence, [0.98, 0.9])
    assert out.degraded_reason.tolist() == ["feature_store_unavailable:class_prior", ""]
    assert (post.stats.fallback_errors, post.stats.prior_rows) == (1, 1)


def test_fallback_with_wrong_shape_serves_the_class_prior() -> None:
    post = Postprocessor(
        0.5, CLASSES, 0.6, fallback=lambda x: np.zeros((len(x), 3)), fallback_name="lr"
    )
    out = post.process(probs(0.1), np.array([False]), features(1), [0])
    np.testing.assert_allclose(out.prediction, [0.6])
    assert out.label.tolist() == ["fraud"]
    assert out.degraded_reason.tolist() == ["feature_store_unavailable:class_prior"]
    assert post.stats.fallback_errors == 1


def test_without_fallback_degraded_rows_get_the_class_prior() -> None:
    post = Postprocessor(0.5, CLASSES, class_prior=0.1, fallback=None)
    out = post.process(probs(0.99), np.array([False]), features(1), [])
    np.testing.assert_allclose(out.prediction, [0.1])
    assert out.degraded.tolist() == [True]
    assert out.degraded_reason.tolist() == ["feature_store_unavailable:class_prior"]


def test_inputs_are_not_modified() -> None:
    p = probs(0.2, 0.4)
    post = Postprocessor(0.5, CLASSES, 0.7, fallback=None)
    post.process(p, np.array([False, False]), features(2), [])
    np.testing.assert_allclose(p, probs(0.2, 0.4))


@pytest.mark.parametrize(
    ("p", "ok", "x", "indices", "message"),
    [
        (np.zeros((2, 3), np.float32), np.ones(2, bool), features(2), [], r"probabilities must"),
        (np.zeros(2, np.float32), np.ones(2, bool), features(2), [], r"probabilities must"),
        (probs(0.1, 0.2), np.ones(3, bool), features(2), [], r"feature_store_ok must"),
        (probs(0.1, 0.2), np.ones(2, bool), features(3), [], r"features must"),
        (probs(0.1, 0.2), np.ones(2, bool), features(2), [6], r"fallback feature indices"),
        (probs(0.1, 0.2), np.ones(2, bool), features(2), [-1], r"fallback feature indices"),
    ],
)
def test_shape_errors(
    p: np.ndarray, ok: np.ndarray, x: np.ndarray, indices: list[int], message: str
) -> None:
    post = Postprocessor(0.5, CLASSES, 0.1, fallback=None)
    with pytest.raises(ValueError, match=message):
        post.process(p, ok, x, indices)


@pytest.mark.parametrize(
    ("threshold", "names", "prior"),
    [(1.5, CLASSES, 0.1), (0.5, ["only"], 0.1), (0.5, CLASSES, -0.1)],
)
def test_rejects_bad_settings(threshold: float, names: list[str], prior: float) -> None:
    with pytest.raises(ValueError):
        Postprocessor(threshold, names, prior, fallback=None)


def test_scores_awaited_by_the_caller_are_served_without_calling_the_fallback() -> None:
    fallback = RecordingFallback(positive=0.1)
    post = Postprocessor(0.5, CLASSES, 0.02, fallback=fallback, fallback_name="fraud_context_lr")
    ok = np.array([True, False])
    x = features(2)
    np.testing.assert_array_equal(post.fallback_inputs(x, ok, [0, 2]), x[[1]][:, [0, 2]])
    out = post.process(probs(0.2, 0.2), ok, x, [0, 2], fallback_scores=probs(0.95))
    assert fallback.calls == []
    np.testing.assert_allclose(out.prediction, [0.2, 0.95])
    assert out.degraded_reason.tolist() == ["", "feature_store_unavailable:fraud_context_lr"]


def test_a_fallback_that_failed_or_timed_out_gives_the_class_prior() -> None:
    post = Postprocessor(0.5, CLASSES, 0.02, fallback=RecordingFallback(), fallback_name="lr")
    ok = np.array([False])
    out = post.process(probs(0.7), ok, features(1), [0], fallback_scores=TimeoutError())
    np.testing.assert_allclose(out.prediction, [0.02])
    assert out.degraded_reason.tolist() == ["feature_store_unavailable:class_prior"]
    assert (post.stats.fallback_errors, post.stats.prior_rows) == (1, 1)


@pytest.mark.parametrize(
    ("cap_us", "timeouts", "budget"),
    [
        (50_000, [], 50_000),  # no request carried a budget: the configured cap
        (50_000, [0, 0], 50_000),  # 0: no timeout
        (50_000, [80_000, 30_000], 30_000),  # the tightest budget of the batch
        (50_000, [120_000], 50_000),  # never above the cap
        (0, [40_000], 40_000),  # no cap configured
        (0, [], 0),
    ],
)
def test_fallback_budget(cap_us: int, timeouts: list[int], budget: int) -> None:
    assert fallback_budget_us(cap_us, timeouts) == budget
