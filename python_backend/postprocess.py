"""Turn class probabilities into the served prediction, with a fallback for degraded rows.

A row whose online features could not be read (``feature_store_ok`` False) was scored on
defaults, so its model output is not trusted. Such rows are re-scored by a fallback model that
only needs request-time features (one call for all degraded rows of a batch); should the
fallback be missing or fail, they get the training class prior.
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
    ) -> PostprocessOutput:
        """Serve ``probabilities [rows, 2]``, re-scoring rows whose features were degraded."""
        probs, ok, feats = self.check_inputs(probabilities, feature_store_ok, features)
        rows = probs.shape[0]
        indices = np.asarray(fallback_indices, dtype=np.intp)
        if indices.size and (indices.min() < 0 or indices.max() >= feats.shape[1]):
            raise ValueError(
                f"fallback feature indices must lie in [0, {feats.shape[1]}), "
                f"got {indices.tolist()}"
            )

        served = probs.copy()
        reasons = np.full(rows, "", dtype=object)
        degraded = ~ok
        n_degraded = int(degraded.sum())
        if n_degraded:
            scores, reason = self._score_degraded(feats[degraded][:, indices])
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

    def _score_degraded(self, x: np.ndarray) -> tuple[np.ndarray, str]:
        """Probabilities ``[k, 2]`` for the degraded rows and the reason to report."""
        k = x.shape[0]
        if self._fallback is not None:
            self.stats.fallback_calls += 1
            try:
                scores = np.asarray(self._fallback(x), dtype=np.float32)
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
