"""Turn class probabilities into the served prediction, with a fallback for degraded rows.

A row whose online features could not be read (``feature_store_ok`` False) was scored on
defaults, so its model output is not trusted. Such rows are re-scored by a fallback model that
only needs request-time features (one call for all degraded rows of a batch); should the
fallback be missing, fail or miss its deadline, they get the training class prior.

The fallback either runs synchronously (``fallback=``, a callable) or is awaited by the caller
beforehand and handed in as ``fallback_scores`` (its result, or the exception it raised):
Triton's shell does the latter, bounding the call by the request's remaining budget
(:func:`fallback_budget_us`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

REASON_PREFIX = "feature_store_unavailable"
CLASS_PRIOR = "class_prior"

Fallback = Callable[[np.ndarray], np.ndarray]
#: what an awaited fallback call gave: probabilities [k, 2], or why it failed
FallbackScores = np.ndarray | BaseException


def fallback_budget_us(cap_us: int, request_timeouts_us: Sequence[int]) -> int:
    """Time the fallback call of a batch may take: ``cap_us``, or less when a request of the
    batch carried a smaller timeout (its budget; 0 means none)."""
    budgets = [t for t in request_timeouts_us if t > 0]
    return min([cap_us, *budgets]) if cap_us > 0 else min(budgets, default=0)


@dataclass(frozen=True, slots=True)
class PostprocessOutput:
    #: float32 [rows]: positive-class probability actually served
    prediction: np.ndarray
    #: object [rows] of str: class name chosen by the threshold
    label: np.ndarray
    #: float32 [rows]: probability of the chosen label
    confidence: np.ndarray
    #: bool [rows]
    degraded: np.ndarray
    #: object [rows] of str: "" when not degraded
    degraded_reason: np.ndarray


@dataclass
class PostprocessStats:
    rows: int = 0
    degraded_rows: int = 0
    fallback_calls: int = 0
    fallback_errors: int = 0
    #: degraded rows served the class prior (no fallback, or it failed)
    prior_rows: int = 0


class Postprocessor:
    """Threshold, labels and confidence; fallback scoring of rows without online features."""

    def __init__(
        self,
        threshold: float,
        class_names: Sequence[str],
        class_prior: float,
        fallback: Fallback | None = None,
        fallback_name: str = "fallback",
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        if len(class_names) != 2:
            raise ValueError(f"expected two class names, got {list(class_names)}")
        if not 0.0 <= class_prior <= 1.0:
            raise ValueError(f"class_prior must lie in [0, 1], got {class_prior}")
        self._threshold = np.float32(threshold)
        self._class_names = np.array(list(class_names), dtype=object)
        self._prior_row = np.array([1.0 - class_prior, class_prior], dtype=np.float32)
        self._fallback = fallback
        self._fallback_reason = f"{REASON_PREFIX}:{fallback_name}"
        self._prior_reason = f"{REASON_PREFIX}:{CLASS_PRIOR}"
        self.stats = PostprocessStats()

    def process(
        self,
        probabilities: np.ndarray,
        feature_store_ok: np.ndarray,
        features: np.ndarray,
        fallback_indices: Sequence[int],
        fallback_scores: FallbackScores | None = None,
    ) -> PostprocessOutput:
        """Serve ``probabilities [rows, 2]``, re-scoring rows whose features were degraded
        (with ``fallback_scores`` when the caller already ran the fallback)."""
        probs, ok, feats = self.check_inputs(probabilities, feature_store_ok, features)
        _check_indices(fallback_indices, feats.shape[1])
        rows = probs.shape[0]
        served = probs.copy()
        reasons = np.full(rows, "", dtype=object)
        degraded = ~ok
        n_degraded = int(degraded.sum())
        if n_degraded:
            x = self.fallback_inputs(feats, ok, fallback_indices)
            scores, reason = self._score_degraded(x, fallback_scores)
            served[degraded] = scores
            reasons[degraded] = reason

        prediction = served[:, 1]
        chosen = (prediction >= self._threshold).astype(np.intp)
        confidence = served[np.arange(rows), chosen]
        self.stats.rows += rows
        self.stats.degraded_rows += n_degraded
        return PostprocessOutput(
            prediction=np.ascontiguousarray(prediction),
            label=self._class_names[chosen],
            confidence=confidence,
            degraded=degraded,
            degraded_reason=reasons,
        )

    @staticmethod
    def fallback_inputs(
        features: np.ndarray, feature_store_ok: np.ndarray, fallback_indices: Sequence[int]
    ) -> np.ndarray:
        """The fallback model's input: the degraded rows' features at ``fallback_indices``."""
        indices = _check_indices(fallback_indices, features.shape[1])
        return features[~feature_store_ok][:, indices]

    @staticmethod
    def check_inputs(
        probabilities: np.ndarray, feature_store_ok: np.ndarray, features: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The inputs as float32/bool arrays; ValueError if their shapes do not fit together."""
        probs = np.asarray(probabilities, dtype=np.float32)
        ok = np.asarray(feature_store_ok, dtype=bool)
        feats = np.asarray(features, dtype=np.float32)
        if probs.ndim != 2 or probs.shape[1] != 2:
            raise ValueError(f"probabilities must have shape [rows, 2], got {list(probs.shape)}")
        rows = probs.shape[0]
        if ok.shape != (rows,):
            raise ValueError(f"feature_store_ok must have shape [{rows}], got {list(ok.shape)}")
        if feats.ndim != 2 or feats.shape[0] != rows:
            raise ValueError(f"features must have shape [{rows}, n], got {list(feats.shape)}")
        return probs, ok, feats

    def _score_degraded(
        self, x: np.ndarray, precomputed: FallbackScores | None
    ) -> tuple[np.ndarray, str]:
        """Probabilities ``[k, 2]`` for the degraded rows and the reason to report."""
        k = x.shape[0]
        if precomputed is not None or self._fallback is not None:
            self.stats.fallback_calls += 1
            try:
                if isinstance(precomputed, BaseException):
                    raise precomputed
                raw = precomputed if precomputed is not None else self._fallback(x)  # type: ignore[misc]
                scores = np.asarray(raw, dtype=np.float32)
            except Exception:
                self.stats.fallback_errors += 1
                logger.exception("fallback failed, serving the class prior to %d rows", k)
            else:
                if scores.shape == (k, 2):
                    return scores, self._fallback_reason
                self.stats.fallback_errors += 1
                logger.error(
                    "fallback returned shape %s for %d rows, serving the class prior",
                    list(scores.shape),
                    k,
                )
        self.stats.prior_rows += k
        return np.broadcast_to(self._prior_row, (k, 2)), self._prior_reason


def _check_indices(fallback_indices: Sequence[int], n_features: int) -> np.ndarray:
    indices = np.asarray(fallback_indices, dtype=np.intp)
    if indices.size and (indices.min() < 0 or indices.max() >= n_features):
        raise ValueError(
            f"fallback feature indices must lie in [0, {n_features}), got {indices.tolist()}"
        )
    return indices
