"""The catalog's fallback_config: parsed strictly, served with a label by threshold."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.catalog.fallback import ClassPriorFallback, parse_fallback


def test_class_prior_is_served_with_its_label_and_confidence() -> None:
    fallback = parse_fallback({"type": "class_prior", "score": 0.035, "threshold": 0.5})
    assert fallback == ClassPriorFallback(score=0.035, threshold=0.5)
    served = fallback.serve()
    assert (served.prediction, served.label) == (0.035, "legit")
    assert served.confidence == pytest.approx(0.965)
    high = ClassPriorFallback(score=0.7, threshold=0.5).serve()
    assert (high.label, high.confidence) == ("fraud", 0.7)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"type": "model", "endpoint": "fraud_context_lr"},
        {"type": "class_prior", "score": 0.035},
        {"type": "class_prior", "score": 1.5, "threshold": 0.5},
        {"type": "class_prior", "score": "0.03", "threshold": 0.5},
        {"type": "class_prior", "score": True, "threshold": 0.5},
    ],
)
def test_unusable_config_means_no_fallback(config: dict[str, Any]) -> None:
    assert parse_fallback(config) is None
