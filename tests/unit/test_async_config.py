"""Async prediction settings, generated secrets and the submit body's callback_url check."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from gateway.asyncpred.config import AsyncPredictSettings, secret_bytes
from gateway.asyncpred.schemas import AsyncPredictRequest
from gateway.errors import describe_validation_errors
from gateway.settings import Settings

BODY = {"entity_ids": {"user_id": "u_1", "merchant_id": "m_1"}, "context": {"amount": 5.0}}


def test_settings_come_from_nested_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTINFER_GATEWAY__ASYNC_PREDICT__CONCURRENCY", "4")
    monkeypatch.setenv(
        "RTINFER_GATEWAY__ASYNC_PREDICT__ALLOWED_CALLBACK_NETWORKS", '["10.0.0.0/8"]'
    )
    monkeypatch.setenv("RTINFER_GATEWAY__ASYNC_PREDICT__CALLBACK_SECRET", "x" * 20)
    config = Settings().gateway.async_predict
    assert config.concurrency == 4
    assert config.allowed_callback_networks == ["10.0.0.0/8"]
    assert config.callback_secret is not None and "x" not in repr(config.callback_secret)


def test_bad_networks_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"not a CIDR network: '10\.0\.0\.0/33'"):
        AsyncPredictSettings(allowed_callback_networks=["10.0.0.0/33"])


def test_a_missing_secret_is_generated_once_and_kept(tmp_path: Path) -> None:
    first = secret_bytes(None, tmp_path, "callback-secret")
    path = tmp_path / "async-predict" / "callback-secret"
    assert len(first) >= 32 and path.read_text().strip().encode() == first
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert secret_bytes(None, tmp_path, "callback-secret") == first
    assert secret_bytes(None, tmp_path, "token-secret") != first


def test_processes_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(secret_bytes(None, tmp_path, "s")))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert [p.name for p in (tmp_path / "async-predict").iterdir()] == ["s"]  # no temp files


def test_a_configured_secret_wins_and_must_be_long_enough(tmp_path: Path) -> None:
    assert secret_bytes(SecretStr("a" * 16), tmp_path, "s") == b"a" * 16
    assert not (tmp_path / "async-predict").exists()
    with pytest.raises(ValueError, match="at least 16"):
        secret_bytes(SecretStr("short"), tmp_path, "s")


def test_the_submit_body_names_a_malformed_callback_url() -> None:
    with pytest.raises(ValidationError) as info:
        AsyncPredictRequest.model_validate({**BODY, "callback_url": "ftp://example.com/x"})
    message = describe_validation_errors(info.value.errors())
    assert message.startswith("callback_url: scheme must be http or https"), message
    with pytest.raises(ValidationError):
        AsyncPredictRequest.model_validate({**BODY, "callback_url": 5})


def test_the_queued_request_drops_the_callback_and_keeps_the_request_id() -> None:
    body = AsyncPredictRequest.model_validate({**BODY, "callback_url": "https://h.example/x"})
    queued = body.prediction_request("req-7")
    assert queued.request_id == "req-7"
    assert queued.entity_ids == body.entity_ids and queued.context == body.context
    assert "callback_url" not in queued.model_dump()
