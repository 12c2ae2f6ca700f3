"""Ground truth in: ``POST /feedback`` labels, validated, produced to ``prediction-labels``.

A label is accepted (2xx) only after Kafka confirmed it (``acks=all``, idempotent producer);
the sink then stores it in ``prediction_labels``, one row per (``request_id``, ``source``): a
label sent again replaces the earlier one, so retries are harmless. A label may name a request
the store has not seen (yet): it is kept and joins when the prediction arrives.
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import datetime
from typing import Annotated

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.asyncpred.confirmed_producer import ConfirmedProducer, DeliveryFailed
from gateway.errors import TryAgainShortly
from gateway.store.queries import LABEL_VALUES
from gateway.store.rows import LABEL_SCHEMA_VERSION

MAX_LABELS = 1000
Source = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


class LabelUnavailable(TryAgainShortly):
    """Kafka did not confirm the labels: none of the batch counts as accepted."""

    code = "feedback_unavailable"


class Feedback(BaseModel):
    """The ground truth of one served request."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=256, description="The prediction's id.")
    label: str | float = Field(
        description=f"One of {', '.join(LABEL_VALUES)}, or its number "
        f"({', '.join(f'{v:g}' for v in LABEL_VALUES.values())})."
    )
    source: Source = Field(description="Where the label comes from: chargeback, analyst, ...")
    observed_at: datetime | None = Field(
        None, description="When the outcome was observed (default: now); ISO 8601 with a zone."
    )

    @field_validator("label", mode="before")
    @classmethod
    def _not_a_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("label must be a label name or its number, not true/false")
        return value

    @field_validator("label")
    @classmethod
    def _known_label(cls, value: str | float) -> str | float:
        known = set(LABEL_VALUES) | set(LABEL_VALUES.values())
        if (isinstance(value, float) and not math.isfinite(value)) or value not in known:
            raise ValueError(
                f"unknown label {value!r}: use one of {', '.join(map(str, sorted(known, key=str)))}"
            )
        return value

    @field_validator("observed_at")
    @classmethod
    def _zoned(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("observed_at needs a time zone, e.g. 2026-12-01T10:00:00Z")
        return value

    def message(self, received_at: float) -> bytes:
        if isinstance(self.label, str):
            name, number = self.label, LABEL_VALUES[self.label]
        else:
            number = float(self.label)
            name = next(k for k, v in LABEL_VALUES.items() if v == number)
        observed = self.observed_at.timestamp() if self.observed_at else received_at
        return orjson.dumps(
            {
                "schema_version": LABEL_SCHEMA_VERSION,
                "request_id": self.request_id,
                "source": self.source,
                "label": name,
                "label_value": number,
                "observed_at": observed,
                "received_at": received_at,
            }
        )


class FeedbackAccepted(BaseModel):
    accepted: int = Field(description="Labels Kafka confirmed.")


class FeedbackDoor:
    """Produces labels; the producer is created on first use (a gateway without Kafka still
    starts, and answers 503 here)."""

    def __init__(self, bootstrap: str, topic: str, timeout_s: float) -> None:
        self._bootstrap, self._topic, self._timeout_s = bootstrap, topic, timeout_s
        self._producer: ConfirmedProducer | None = None

    def _labels(self) -> ConfirmedProducer:
        if self._producer is None:
            self._producer = ConfirmedProducer(
                self._bootstrap, client_id="rtinfer-feedback", timeout_s=self._timeout_s
            )
        return self._producer

    async def submit(self, labels: list[Feedback]) -> FeedbackAccepted:
        producer, now = self._labels(), time.time()
        sends = [
            producer.send(self._topic, label.request_id.encode(), label.message(now))
            for label in labels
        ]
        try:
            async with asyncio.timeout(self._timeout_s + 1.0):
                await asyncio.gather(*sends)
        except (DeliveryFailed, TimeoutError) as exc:
            raise LabelUnavailable(
                f"Kafka did not confirm the labels ({exc}); send them again (safe: a label "
                "replaces the same request's and source's)"
            ) from None
        return FeedbackAccepted(accepted=len(labels))

    async def close(self) -> None:
        if self._producer is not None:
            await asyncio.to_thread(self._producer.close, 5.0)
