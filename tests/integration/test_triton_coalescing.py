"""Concurrent predictions share Triton calls; each row keeps its own answer, error and deadline."""

from __future__ import annotations

import asyncio
import math

import pytest

from gateway.errors import DeadlineExceeded, InvalidRequest
from gateway.metrics import GatewayMetrics
from gateway.serving.triton_client import TritonClient
from python_backend.contract import CONTEXT_FEATURES
from rtinfer.client import FraudClient
from rtinfer.stack import StackState

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(120)]

ENDPOINT = "fraud_xgb_pipeline"


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


def rows(n: int) -> list[tuple[str, str, list[float]]]:
    out = []
    for i in range(n):
        ctx = [math.nan] * len(CONTEXT_FEATURES)
        ctx[0] = 10.0 + 37.0 * i  # amount
        out.append((f"u_{i * 97 % 20000:06d}", f"m_{i * 13 % 2000:05d}", ctx))
    return out


def batch_rows(metrics: GatewayMetrics) -> tuple[float, float]:
    """(calls, rows) observed by the batch-size histogram."""
    count = total = 0.0
    for metric in metrics.triton_batch_rows.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
    return count, total


async def test_concurrent_rows_share_calls_and_match_single_row_answers(
    running_stack: StackState, clients: dict[str, FraudClient]
) -> None:
    metrics = GatewayMetrics()
    client = TritonClient(running_stack.triton_ports.grpc_url, metrics, max_calls=1)
    try:
        work = rows(48)
        results = await asyncio.gather(
            *(
                client.infer(ENDPOINT, u, m, ctx, request_id=f"c-{i}", timeout_s=10.0)
                for i, (u, m, ctx) in enumerate(work)
            )
        )
    finally:
        await client.close()
    calls, sent = batch_rows(metrics)
    assert sent == 48 and calls < 48, (calls, sent)  # coalesced, none lost
    for (u, m, ctx), got in zip(work, results, strict=True):
        direct = clients["grpc"].predict_one(ENDPOINT, u, m, {"amount": ctx[0]})
        assert got.prediction == pytest.approx(direct.prediction, abs=1e-6)
        assert got.features == pytest.approx(direct.features, abs=1e-5)
        assert (got.label, got.degraded) == (direct.label, False)


async def test_a_bad_row_fails_alone_and_a_spent_deadline_does_not_cancel_the_batch(
    running_stack: StackState,
) -> None:
    client = TritonClient(running_stack.triton_ports.grpc_url, max_calls=1)
    try:
        work = rows(12)
        bad = "u_" + "x" * 300  # over the assembler's id limit: INVALID_ARGUMENT from Triton
        calls = [
            client.infer(ENDPOINT, u, m, ctx, request_id=f"b-{i}", timeout_s=10.0)
            for i, (u, m, ctx) in enumerate(work)
        ]
        calls.insert(
            5, client.infer(ENDPOINT, bad, "m_00001", work[0][2], request_id="bad", timeout_s=10.0)
        )
        calls.insert(
            7,
            client.infer(
                ENDPOINT, "u_000001", "m_00001", work[0][2], request_id="hurried", timeout_s=0.0005
            ),
        )
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await client.close()
    assert isinstance(outcomes[5], InvalidRequest), outcomes[5]
    assert isinstance(outcomes[7], DeadlineExceeded), outcomes[7]
    served = [o for i, o in enumerate(outcomes) if i not in (5, 7)]
    assert len(served) == 12
    assert all(not isinstance(o, BaseException) and not o.degraded for o in served), served
