"""What a deployment serves when Triton cannot answer: its catalog ``fallback_config``.

The only type in this version is the class prior::

    {"type": "class_prior", "score": 0.035, "threshold": 0.5}

``score`` is served as the fraud probability, labelled by ``threshold``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

FRAUD, LEGIT = "fraud", "legit"


@dataclass(frozen=True)
class FallbackScore:
    prediction: float
    label: str
    confidence: float


@dataclass(frozen=True)
class ClassPriorFallback:
    score: float
    threshold: float
    type: str = "class_prior"

    def serve(self) -> FallbackScore:
        fraud = self.score >= self.threshold
        return FallbackScore(
            prediction=self.score,
            label=FRAUD if fraud else LEGIT,
            confidence=self.score if fraud else 1.0 - self.score,
        )


def parse_fallback(config: Mapping[str, Any], where: str = "") -> ClassPriorFallback | None:
    """The fallback of a catalog row; ``None`` (logged) when absent or not understood."""
    if not config:
        return None
    kind = config.get("type")
    if kind == "class_prior":
        score, threshold = config.get("score"), config.get("threshold")
        if _probability(score) and _probability(threshold):
            return ClassPriorFallback(float(score), float(threshold))  # type: ignore[arg-type]
    log.warning("ignoring unusable fallback_config %s of %s", dict(config), where or "a deployment")
    return None


def _probability(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0.0 <= value <= 1.0
    )
