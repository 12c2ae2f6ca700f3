"""Verify and parse MLflow webhook deliveries (MLflow 3 model registry webhooks).

MLflow signs each delivery the Standard Webhooks way (``mlflow/webhooks/delivery.py``):

* ``X-MLflow-Delivery-Id``: a UUID, new for every delivery (a retry of the same HTTP request
  by urllib3 keeps it);
* ``X-MLflow-Timestamp``: unix seconds, as a decimal string;
* ``X-MLflow-Signature``: ``v1,<base64 HMAC-SHA256>`` of ``<delivery id>.<timestamp>.<body>``
  keyed with the webhook's secret (UTF-8), the body being the exact bytes sent.

The body is ``{"entity", "action", "timestamp", "data"}``; ``<entity>.<action>`` names the
event, ``data`` is the payload of ``mlflow/webhooks/types.py``. Everything here is pure:
the deployer service calls it with the request's headers and raw body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from gateway.errors import GatewayError, InvalidRequest

DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
SIGNATURE_HEADER = "X-MLflow-Signature"
SIGNATURE_VERSION = "v1"
#: a delivery id is a UUID; anything longer is not MLflow's
MAX_DELIVERY_ID_LEN = 128

#: the registry events the rollout acts on
EventType = Literal[
    "model_version.created",
    "model_version_alias.created",
    "model_version_alias.deleted",
]
ACTED_EVENTS: frozenset[str] = frozenset(get_args(EventType))


class WebhookRejected(GatewayError):
    """The delivery is not provably from our MLflow: signature missing/forged, or stale."""

    status, code = 401, "webhook_rejected"


class InvalidWebhookPayload(InvalidRequest):
    """A correctly signed delivery whose body is not a registry event we understand."""

    code = "invalid_webhook_payload"


@dataclass(frozen=True)
class RegistryEvent:
    """One model registry event, from a webhook delivery."""

    delivery_id: str
    event: str
    model: str
    #: the version created or aliased; None for an alias deletion
    version: int | None = None
    alias: str | None = None
    run_id: str | None = None
    source: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def acted_on(self) -> bool:
        """True for the events the rollout acts on (others are only recorded)."""
        return self.event in ACTED_EVENTS


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery."""
    signed = b".".join((delivery_id.encode(), timestamp.encode(), body))
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def _signatures(header: str) -> list[bytes]:
    """The ``v1`` signatures of a header (space-separated ``v1,<b64>`` entries)."""
    out = []
    for entry in header.split():
        version, _, value = entry.partition(",")
        if version != SIGNATURE_VERSION or not value:
            continue
        try:
            out.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue
    return out


def verify_delivery(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    max_skew_s: float,
) -> str:
    """Check signature and timestamp of a delivery; return its delivery id.

    Raises :class:`WebhookRejected` for a missing header, a signature that does not match
    (compared in constant time), or a timestamp more than ``max_skew_s`` from ``now``.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    delivery_id = lowered.get(DELIVERY_ID_HEADER.lower(), "").strip()
    timestamp = lowered.get(TIMESTAMP_HEADER.lower(), "").strip()
    signature = lowered.get(SIGNATURE_HEADER.lower(), "").strip()
    for name, value in (
        (DELIVERY_ID_HEADER, delivery_id),
        (TIMESTAMP_HEADER, timestamp),
        (SIGNATURE_HEADER, signature),
    ):
        if not value:
            raise WebhookRejected(f"missing {name} header; is the webhook's secret set?")
    if len(delivery_id) > MAX_DELIVERY_ID_LEN or not delivery_id.isascii():
        raise WebhookRejected(f"malformed {DELIVERY_ID_HEADER} header")
    if not (timestamp.isascii() and timestamp.isdigit()):
        raise WebhookRejected(f"malformed {TIMESTAMP_HEADER} header: expected unix seconds")
    expected = base64.b64decode(sign(secret, delivery_id, timestamp, body).partition(",")[2])
    # compare against every candidate, so timing does not depend on which one matched
    matched = False
    for candidate in _signatures(signature):
        matched |= hmac.compare_digest(candidate, expected)
    if not matched:
        raise WebhookRejected(
            f"{SIGNATURE_HEADER} does not match the delivery (wrong secret or altered body)"
        )
    skew = abs(now - int(timestamp))
    if skew > max_skew_s:
        raise WebhookRejected(
            f"delivery timestamp is {skew:.0f}s from now (more than {max_skew_s:.0f}s): "
            "stale or replayed"
        )
    return delivery_id


def _text(data: Mapping[str, Any], key: str, *, required: bool) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidWebhookPayload(f"webhook data.{key} must be a non-empty string")
    return value


def _version(data: Mapping[str, Any]) -> int:
    raw = _text(data, "version", required=True)
    assert raw is not None
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise InvalidWebhookPayload(f"webhook data.version {raw!r} is not a version number")
    return int(raw)


def parse_event(delivery_id: str, body: bytes) -> RegistryEvent:
    """The registry event of a verified delivery.

    Events the rollout does not act on (tags, prompts, ...) parse with their name and the
    model name when there is one; the three acted-on events are checked field by field.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidWebhookPayload(f"webhook body is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidWebhookPayload("webhook body must be a JSON object")
    entity, action, data = doc.get("entity"), doc.get("action"), doc.get("data")
    if not isinstance(entity, str) or not isinstance(action, str) or not isinstance(data, dict):
        raise InvalidWebhookPayload("webhook body needs string entity, action and object data")
    event = f"{entity}.{action}"
    if event not in ACTED_EVENTS:
        name = data.get("name")
        return RegistryEvent(delivery_id, event, name if isinstance(name, str) else "")
    model = _text(data, "name", required=True)
    assert model is not None
    if event == "model_version.created":
        tags = data.get("tags") or {}
        if not isinstance(tags, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
        ):
            raise InvalidWebhookPayload("webhook data.tags must map strings to strings")
        return RegistryEvent(
            delivery_id,
            event,
            model,
            version=_version(data),
            run_id=_text(data, "run_id", required=False),
            source=_text(data, "source", required=False),
            tags=tags,
        )
    alias = _text(data, "alias", required=True)
    version = _version(data) if event == "model_version_alias.created" else None
    return RegistryEvent(delivery_id, event, model, version=version, alias=alias)
