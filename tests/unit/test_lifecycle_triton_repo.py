"""Pure parts of the repository helpers: the load override and the error mapping."""

from __future__ import annotations

import asyncio
import json

import pytest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from gateway.lifecycle.errors import (
    LifecycleError,
    ModelLoadFailed,
    RepositoryUnavailable,
    VersionNotReady,
)
from gateway.lifecycle.triton_repo import TritonRepository, config_json
from gateway.repository.configs import set_version_policy
from gateway.repository.layout import RenderError


def test_override_carries_the_version_policy_in_triton_field_names() -> None:
    config = mc.ModelConfig(name="fraud_xgb", backend="python", max_batch_size=64)
    set_version_policy(config, [2, 1, 2])
    doc = json.loads(config_json(config))
    assert doc["max_batch_size"] == 64
    assert [int(v) for v in doc["version_policy"]["specific"]["versions"]] == [1, 2]
    with pytest.raises(RenderError, match="versions to serve must be >= 1"):
        set_version_policy(config, [])


@pytest.mark.parametrize(
    ("status", "loading", "error"),
    [
        ("StatusCode.UNAVAILABLE", True, RepositoryUnavailable),
        ("StatusCode.DEADLINE_EXCEEDED", True, VersionNotReady),
        ("StatusCode.INVALID_ARGUMENT", True, ModelLoadFailed),
        ("StatusCode.NOT_FOUND", False, LifecycleError),
    ],
)
def test_errors_keep_tritons_message(status: str, loading: bool, error: type) -> None:
    async def make() -> LifecycleError:
        repo = TritonRepository("127.0.0.1:1")
        try:
            exc = InferenceServerException("version 3 is at UNAVAILABLE state: boom", status)
            return repo._error(exc, "fraud_xgb", loading=loading)
        finally:
            await repo.close()

    mapped = asyncio.run(make())
    assert type(mapped) is error
    assert "version 3 is at UNAVAILABLE state: boom" in mapped.message
    assert "fraud_xgb" in mapped.message
