"""The Triton client carries each request's budget into Triton and fails fast on a broken
endpoint (a fake gRPC client stands in for Triton)."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from gateway.errors import DeadlineExceeded, UpstreamError
from gateway.serving.triton_client import TritonClient


def response(rows: int) -> service_pb2.ModelInferResponse:
    """What the ensemble answers for ``rows`` rows (raw output tensors)."""
    out = service_pb2.ModelInferResponse(model_name="p")

    def strings(value: bytes) -> bytes:
        return (struct.pack("<I", len(value)) + value) * rows

    tensors = {
        "prediction": np.full(rows, 0.25, "<f4").tobytes(),
        "label": strings(b"legit"),
        "confidence": np.full(rows, 0.75, "<f4").tobytes(),
        "degraded": np.zeros(rows, np.bool_).tobytes(),
        "degraded_reason": strings(b""),
        "imputed_count": np.zeros(rows, "<i4").tobytes(),
        "features": np.full((rows, 50), 0.5, "<f4").tobytes(),
    }
    for name, raw in tensors.items():
        out.outputs.add().name = name
        out.raw_output_contents.append(raw)
    return out


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class FakeModelInfer:
    """Stands in for the ModelInfer call of Triton's gRPC service."""

    def __init__(self, errors: list[grpc.aio.AioRpcError] | None = None) -> None:
        self.calls: list[tuple[service_pb2.ModelInferRequest, float]] = []
        self.errors = errors or []

    async def __call__(
        self, request: service_pb2.ModelInferRequest, timeout: float
    ) -> service_pb2.ModelInferResponse:
        self.calls.append((request, timeout))
        if self.errors:
            raise self.errors.pop(0)
        return response(request.inputs[0].shape[0])


def _client(fake: FakeModelInfer, grace_s: float = 1.0) -> TritonClient:
    client = TritonClient("triton:8001", call_grace_s=grace_s)
    client._model_infer = fake  # type: ignore[assignment]
    return client


def _infer(client: TritonClient, timeout_s: float) -> Any:
    return client.infer("p", "u_1", "m_1", [0.0] * 10, request_id="r", timeout_s=timeout_s)


def test_the_remaining_budget_is_tritons_timeout_and_the_call_may_outlive_it() -> None:
    async def run() -> None:
        fake = FakeModelInfer()
        client = _client(fake, grace_s=1.0)
        result = await _infer(client, 0.080)
        assert (result.prediction, result.label, result.confidence) == (0.25, "legit", 0.75)
        ((request, grpc_timeout),) = fake.calls
        triton_us = request.parameters["timeout"].int64_param
        assert 70_000 < triton_us <= 80_000  # microseconds, what is left of 80 ms
        assert grpc_timeout == pytest.approx(triton_us / 1e6 + 1.0, abs=1e-3)
        assert request.id == "r" and request.parameters["rtinfer_logged_by"].string_param
        with pytest.raises(DeadlineExceeded, match="no time left"):
            await _infer(client, 0.0)  # spent: never queued, never sent
        assert len(fake.calls) == 1
        await client.close()

    asyncio.run(run())


def test_a_queue_timeout_is_a_deadline_and_a_dead_stub_fails_fast() -> None:
    async def run() -> None:
        expired = rpc_error(grpc.StatusCode.UNAVAILABLE, "in ensemble 'p', Request timeout expired")
        dead = rpc_error(
            grpc.StatusCode.INTERNAL,
            "in ensemble 'p', Stub process 'feature_assembler_0_0' is not healthy.",
        )
        fake = FakeModelInfer([expired, dead, dead, dead, dead])
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
