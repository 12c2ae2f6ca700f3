"""MLflow webhook deliveries, as MLflow's own delivery code sends them, verified and parsed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest
from mlflow.webhooks import delivery
from rollout_fakes import SECRET, mlflow_delivery

from gateway.lifecycle.mlflow_hooks import (
    InvalidWebhookPayload,
    RegistryEvent,
    WebhookRejected,
    parse_event,
    sign,
    verify_delivery,
)

SKEW = 300.0


def _now(headers: Mapping[str, str]) -> float:
    return float(headers["X-MLflow-Timestamp"])


def test_a_delivery_signed_by_mlflow_verifies_and_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = {
        "name": "fraud_xgb",
        "version": "3",
        "source": "mlflow-artifacts:/1/abc/artifacts/model",
        "run_id": "abc",
        "tags": {"rtinfer.traffic_pct": "25"},
        "description": None,
    }
    headers, body = mlflow_delivery(monkeypatch, "model_version.created", payload)
    delivery_id = verify_delivery(SECRET, headers, body, now=_now(headers), max_skew_s=SKEW)
    assert delivery_id == headers["X-MLflow-Delivery-Id"]
    assert parse_event(delivery_id, body) == RegistryEvent(
        delivery_id,
        "model_version.created",
        "fraud_xgb",
        version=3,
        run_id="abc",
        source="mlflow-artifacts:/1/abc/artifacts/model",
        tags={"rtinfer.traffic_pct": "25"},
    )


def test_our_signature_is_mlflows(monkeypatch: pytest.MonkeyPatch) -> None:
    headers, body = mlflow_delivery(
        monkeypatch, "model_version_alias.created", {"name": "m", "alias": "a", "version": "1"}
    )
    args = (headers["X-MLflow-Delivery-Id"], headers["X-MLflow-Timestamp"])
    assert sign(SECRET, *args, body) == headers["X-MLflow-Signature"]
    assert delivery._generate_hmac_signature(SECRET, *args, body.decode()) == sign(
        SECRET, *args, body
    )


@pytest.mark.parametrize(
    ("event", "payload", "expected"),
    [
        (
            "model_version_alias.created",
            {"name": "fraud_nn", "alias": "champion", "version": "7"},
            {"model": "fraud_nn", "version": 7, "alias": "champion"},
        ),
        (
            "model_version_alias.deleted",
            {"name": "fraud_nn", "alias": "canary"},
            {"model": "fraud_nn", "version": None, "alias": "canary"},
        ),
    ],
)
def test_alias_events_parse(
    monkeypatch: pytest.MonkeyPatch,
    event: str,
    payload: dict[str, str],
    expected: dict[str, Any],
) -> None:
    headers, body = mlflow_delivery(monkeypatch, event, payload)
    delivery_id = verify_delivery(SECRET, headers, body, now=_now(headers), max_skew_s=SKEW)
    parsed = parse_event(delivery_id, body)
    assert parsed.event == event and parsed.acted_on
    assert {"model": parsed.model, "version": parsed.version, "alias": parsed.alias} == expected


def test_events_not_acted_on_parse_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = {"name": "fraud_xgb", "version": "1", "key": "k", "value": "v"}
    headers, body = mlflow_delivery(monkeypatch, "model_version_tag.set", payload)
    parsed = parse_event(headers["X-MLflow-Delivery-Id"], body)
    assert (parsed.event, parsed.model, parsed.acted_on) == (
        "model_version_tag.set",
        "fraud_xgb",
        False,
    )


ALIAS = {"name": "fraud_xgb", "alias": "champion", "version": "2"}


def test_a_forged_signature_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    headers, body = mlflow_delivery(monkeypatch, "model_version_alias.created", ALIAS)
    with pytest.raises(WebhookRejected, match="does not match") as err:
        verify_delivery("another-secret", headers, body, now=_now(headers), max_skew_s=SKEW)
    assert (err.value.status, err.value.code) == (401, "webhook_rejected")


def test_an_altered_body_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    headers, body = mlflow_delivery(monkeypatch, "model_version_alias.created", ALIAS)
    altered = body.replace(b'"version": "2"', b'"version": "9"')
    assert altered != body
    with pytest.raises(WebhookRejected, match="does not match"):
        verify_delivery(SECRET, headers, altered, now=_now(headers), max_skew_s=SKEW)


def test_a_signature_cannot_be_moved_to_another_delivery_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    headers, body = mlflow_delivery(monkeypatch, "model_version_alias.created", ALIAS)
    headers["X-MLflow-Delivery-Id"] = "00000000-0000-0000-0000-000000000000"
    with pytest.raises(WebhookRejected, match="does not match"):
        verify_delivery(SECRET, headers, body, now=_now(headers), max_skew_s=SKEW)


def test_an_unsigned_delivery_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    headers, body = mlflow_delivery(monkeypatch, "model_version_alias.created", ALIAS, secret=None)
    assert "X-MLflow-Signature" not in headers
    with pytest.raises(WebhookRejected, match="missing X-MLflow-Signature"):
        verify_delivery(SECRET, headers, body, now=_now(headers), max_skew_s=SKEW)


@pytest.mark.parametrize("offset", [-(SKEW + 1), SKEW + 1])
def test_a_stale_or_future_timestamp_is_rejected(
    monkeypatch: pytest.MonkeyPatch, offset: float
) -> None:
    headers, body = mlflow_delivery(monkeypatch, "model_version_alias.created", ALIAS)
    now = _now(headers)
    verify_delivery(SECRET, headers, body, now=now + offset / 2, max_skew_s=SKEW)
    with pytest.raises(WebhookRejected, match="stale or replayed"):
        verify_delivery(SECRET, headers, body, now=now + offset, max_skew_s=SKEW)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"X-MLflow-Delivery-Id": ""}, "missing X-MLflow-Delivery-Id"),
        ({"X-MLflow-Timestamp": "12a"}, "malformed X-MLflow-Timestamp"),
        ({"X-MLflow-Signature": "v1,not base64!"}, "does not match"),
        ({"X-MLflow-Signature": "v2,AAAA"}, "does not match"),
    ],
)
def test_malformed_headers_are_rejected(
    monkeypatch: pytest.MonkeyPatch, change: dict[str, str], match: str
) -> None:
    headers, body = mlflow_delivery(monkeypatch, "model_version_alias.created", ALIAS)
    now = _now(headers)
    headers.update(change)
    with pytest.raises(WebhookRejected, match=match):
        verify_delivery(SECRET, headers, body, now=now, max_skew_s=SKEW)


def test_headers_are_matched_case_insensitively(monkeypatch: pytest.MonkeyPatch) -> None:
    headers, body = mlflow_delivery(monkeypatch, "model_version_alias.created", ALIAS)
    lowered = {k.lower(): v for k, v in headers.items()}
    assert verify_delivery(SECRET, lowered, body, now=_now(headers), max_skew_s=SKEW)


def test_rotated_secrets_may_send_several_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    headers, body = mlflow_delivery(monkeypatch, "model_version_alias.created", ALIAS)
    headers["X-MLflow-Signature"] = f"v1,AAAA {headers['X-MLflow-Signature']}"
    assert verify_delivery(SECRET, headers, body, now=_now(headers), max_skew_s=SKEW)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ("not json", "not JSON"),
        ([], "JSON object"),
        ({"entity": "model_version", "action": "created"}, "object data"),
        (
            {"entity": "model_version", "action": "created", "data": {"name": "m"}},
            "data.version",
        ),
        (
            {
                "entity": "model_version",
                "action": "created",
                "data": {"name": "m", "version": "x1"},
            },
            "not a version number",
        ),
        (
            {
                "entity": "model_version_alias",
                "action": "created",
                "data": {"name": "m", "version": "1"},
            },
            "data.alias",
        ),
        (
            {
                "entity": "model_version",
                "action": "created",
                "data": {"name": "m", "version": "1", "tags": {"k": 1}},
            },
            "data.tags",
        ),
    ],
)
def test_signed_but_malformed_bodies_are_invalid(doc: object, match: str) -> None:
    body = doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()
    with pytest.raises(InvalidWebhookPayload, match=match) as err:
        parse_event("d-1", body)
    assert err.value.status == 422
