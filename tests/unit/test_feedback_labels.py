"""POST /feedback's label schema: known labels only, a zoned time, one Kafka message each."""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
import pytest
from pydantic import ValidationError

from gateway.store.feedback import Feedback
from gateway.store.rows import label_row


@pytest.mark.parametrize(
    ("label", "name", "value"),
    [("fraud", "fraud", 1.0), ("legit", "legit", 0.0), (1, "fraud", 1.0), (0.0, "legit", 0.0)],
)
def test_labels_and_their_numbers_are_accepted(label: object, name: str, value: float) -> None:
    fb = Feedback(request_id="r-1", label=label, source="chargeback")  # type: ignore[arg-type]
    message = orjson.loads(fb.message(received_at=1_796_000_000.0))
    assert (message["label"], message["label_value"]) == (name, value)
    assert message["observed_at"] == message["received_at"] == 1_796_000_000.0
    assert label_row(fb.message(1_796_000_000.0))["source"] == "chargeback"  # the sink loads it


@pytest.mark.parametrize("label", ["suspicious", "FRAUD", 0.5, 2, float("nan"), True])
def test_unknown_labels_are_refused(label: object) -> None:
    with pytest.raises(ValidationError, match="label"):
        Feedback(request_id="r-1", label=label, source="chargeback")  # type: ignore[arg-type]


def test_observed_at_needs_a_zone_and_is_kept() -> None:
    with pytest.raises(ValidationError, match="time zone"):
        Feedback(request_id="r", label="fraud", source="s", observed_at=datetime(2026, 12, 1))
    at = datetime(2026, 11, 30, 12, tzinfo=timezone.utc)
    fb = Feedback(request_id="r", label="fraud", source="s", observed_at=at)
    assert orjson.loads(fb.message(1_796_000_000.0))["observed_at"] == at.timestamp()


@pytest.mark.parametrize("source", ["", "a b", "x" * 65])
def test_sources_are_short_names(source: str) -> None:
    with pytest.raises(ValidationError, match="source"):
        Feedback(request_id="r", label="fraud", source=source)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        Feedback(request_id="r", label="fraud", source="s", lable="fraud")  # type: ignore[call-arg]
