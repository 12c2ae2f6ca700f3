"""Bad requests get a clear per-request error; the server keeps serving everyone else."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from python_backend.contract import context_vector
from rtinfer.client import FraudClient
from rtinfer.stack import StackState

pytestmark = pytest.mark.integration

MODEL = "fraud_xgb_pipeline"
GOOD_CTX = context_vector({"amount": 10.0, "hour_of_day": 12})


def _module(protocol: str) -> Any:
    return httpclient if protocol == "http" else grpcclient


def _raw_client(state: StackState, protocol: str) -> Any:
    ports = state.triton_ports
    if protocol == "http":
        return httpclient.InferenceServerClient(ports.http_url)
    return grpcclient.InferenceServerClient(ports.grpc_url)


def _tensor(mod: Any, name: str, arr: np.ndarray, dtype: str) -> Any:
    t = mod.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def _ids(*values: bytes) -> np.ndarray:
    return np.array([[v] for v in values], dtype=object)


def _request(
    mod: Any,
    users: np.ndarray | None = None,
    merchants: np.ndarray | None = None,
    ctx: np.ndarray | None = None,
    ctx_dtype: str = "FP32",
) -> list[Any]:
    users = _ids(b"u_000001") if users is None else users
    merchants = _ids(b"m_00001") if merchants is None else merchants
    ctx = np.array([GOOD_CTX] * len(users), dtype=np.float32) if ctx is None else ctx
    return [
        _tensor(mod, "user_id", users, "BYTES"),
        _tensor(mod, "merchant_id", merchants, "BYTES"),
        _tensor(mod, "context", ctx, ctx_dtype),
    ]


BAD_REQUESTS: dict[str, tuple[Callable[[Any], list[Any]], str]] = {
    "empty user id": (lambda m: _request(m, users=_ids(b"")), "user_id"),
    "blank merchant id": (lambda m: _request(m, merchants=_ids(b"   ")), "merchant_id"),
    "non-utf8 user id": (lambda m: _request(m, users=_ids(b"\xff\xfe\xfa")), "UTF-8"),
    "context wrong dtype": (
        lambda m: _request(m, ctx=np.ones((1, 10), dtype=np.int32), ctx_dtype="INT32"),
        "context",
    ),
    "context wrong shape": (
        lambda m: _request(m, ctx=np.ones((1, 9), dtype=np.float32)),
        "context",
    ),
    "missing input": (lambda m: _request(m)[:2], "context"),
    "batch over the limit": (
        lambda m: _request(
            m,
            users=_ids(*[b"u_000001"] * 65),
            merchants=_ids(*[b"m_00001"] * 65),
            ctx=np.ones((65, 10), dtype=np.float32),
        ),
        "batch",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_clear_error_and_server_keeps_serving(
    case: str, protocol: str, running_stack: StackState, clients: dict[str, FraudClient]
) -> None:
    build, expected_text = BAD_REQUESTS[case]
    mod = _module(protocol)
    raw = _raw_client(running_stack, protocol)
    try:
        with pytest.raises(InferenceServerException) as err:
            raw.infer(MODEL, build(mod))
    finally:
        raw.close()
    message = str(err.value)
    assert expected_text.lower() in message.lower(), message
    # the server keeps serving
    ok = clients[protocol].predict_one(MODEL, "u_000001", "m_00001", {"amount": 10.0})
    assert 0.0 <= ok.prediction <= 1.0


def test_one_bad_request_does_not_fail_its_batch(running_stack: StackState) -> None:
    """Bad and good requests arrive together; only the bad one fails."""
    ports = running_stack.triton_ports

    def send(i: int) -> str:
        c = grpcclient.InferenceServerClient(ports.grpc_url)
        try:
            users = _ids(b"" if i % 4 == 0 else f"u_{i:06d}".encode())
            c.infer(MODEL, _request(grpcclient, users=users))
            return "ok"
        except InferenceServerException as exc:
            return f"error: {exc}"
        finally:
            c.close()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, range(64)))
    for i, r in enumerate(results):
        if i % 4 == 0:
            assert r.startswith("error") and "user_id" in r, r
        else:
            assert r == "ok", r
