"""The Triton client carries each request's budget into Triton and fails fast on a broken
endpoint (a fake gRPC client stands in for Triton)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from gateway.errors import DeadlineExceeded, UpstreamError
from gateway.serving.triton_client import TritonClient


class FakeResult:
    def __init__(self, rows: int) -> None:
        self.rows = rows

    def as_numpy(self, name: str) -> np.ndarray:
        if name in ("label", "degraded_reason"):
            return np.array([[b"legit" if name == "label" else b""]] * self.rows, dtype=object)
        if name == "degraded":
            return np.zeros((self.rows, 1), dtype=bool)
        if name == "imputed_count":
            return np.zeros((self.rows, 1), dtype=np.int32)
        width = 50 if name == "features" else 1
        return np.full((self.rows, width), 0.25, dtype=np.float32)


class FakeGrpc:
    def __init__(self, errors: list[InferenceServerException] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.errors = errors or []

    async def infer(self, model_name: str, inputs: list[Any], **kw: Any) -> FakeResult:
        self.calls.append({"model": model_name, **kw})
        if self.errors:
            raise self.errors.pop(0)
        return FakeResult(inputs[0].shape()[0])

    async def close(self) -> None:
        return None


def _client(fake: FakeGrpc, grace_s: float = 1.0) -> TritonClient:
    client = TritonClient("triton:8001", call_grace_s=grace_s)
    client._client = fake  # type: ignore[assignment]
    return client


def _infer(client: TritonClient, timeout_s: float) -> Any:
    return client.infer("p", "u_1", "m_1", [0.0] * 10, request_id="r", timeout_s=timeout_s)


def test_the_remaining_budget_is_tritons_timeout_and_the_call_may_outlive_it() -> None:
    async def run() -> None:
        fake = FakeGrpc()
        client = _client(fake, grace_s=1.0)
        await _infer(client, 0.080)
        (call,) = fake.calls
        assert 70_000 < call["timeout"] <= 80_000  # microseconds, what is left of 80 ms
        assert call["client_timeout"] == pytest.approx(call["timeout"] / 1e6 + 1.0, abs=1e-3)
        with pytest.raises(DeadlineExceeded, match="no time left"):
            await _infer(client, 0.0)  # spent: never queued, never sent
        assert len(fake.calls) == 1
        await client.close()

    asyncio.run(run())


def test_a_queue_timeout_is_a_deadline_and_a_dead_stub_fails_fast() -> None:
    async def run() -> None:
        expired = InferenceServerException(
            "in ensemble 'p', Request timeout expired", status="StatusCode.UNAVAILABLE"
        )
        dead = InferenceServerException(
            "in ensemble 'p', Stub process 'feature_assembler_0_0' is not healthy.",
            status="StatusCode.INTERNAL",
        )
        fake = FakeGrpc([expired, dead, dead, dead, dead])
        client = _client(fake)
        with pytest.raises(DeadlineExceeded):
            await _infer(client, 1.0)
        assert not client.guard.state("p").open  # a timeout never opens the guard
        with pytest.raises(UpstreamError, match="not healthy"):
            await _infer(client, 1.0)
        assert client.guard.state("p").open
        calls = len(fake.calls)
        with pytest.raises(UpstreamError, match="failing fast"):
            await _infer(client, 1.0)
        assert len(fake.calls) - calls <= 1  # at most the guard's own background probe
        await client.close()

    asyncio.run(run())
