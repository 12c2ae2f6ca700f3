"""The fast path of POST /predict/{model}: what it serves itself and what it passes on."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, Unauthorized
from gateway.http import fast_predict
from gateway.http.fast_predict import FastPredict
from gateway.schemas import PredictRequest, PredictResponse

pytestmark = pytest.mark.anyio

BODY = {"entity_ids": {"user_id": "u_000001", "merchant_id": "m_00001"}, "context": {}}
ANSWER = PredictResponse(
    prediction=0.1,
    label="legit",
    confidence=0.9,
    model_name="fraud_xgb",
    model_version="1",
    deployment_arm="prod",
    degraded=False,
    degraded_reason=None,
    request_id="r1",
    latency_ms=1.5,
)


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


class Downstream:
    """The app behind the fast path: records what reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = (await receive())["body"]
        self.seen.append((scope["path"], body))
        await JSONResponse({"from": "app"}, status_code=299)(scope, receive, send)


@pytest.fixture()
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, PredictRequest]]:
    calls: list[tuple[str, PredictRequest]] = []

    async def serve(
        request: Request, model: str, body: PredictRequest
    ) -> tuple[PredictResponse, dict[str, str]]:
        calls.append((model, body))
        return ANSWER, {"X-Request-ID": "r1"}

    async def no_auth(request: Request) -> None:
        return None

    monkeypatch.setattr(fast_predict, "serve_prediction", serve)
    monkeypatch.setattr(fast_predict, "authenticated", no_auth)
    return calls


async def _render(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return JSONResponse({"error": exc.code}, status_code=exc.status)


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


async def test_valid_request_is_served_without_the_app(
    served: list[tuple[str, PredictRequest]],
) -> None:
    down = Downstream()
    async with _client(FastPredict(down, _render)) as client:
        r = await client.post("/predict/fraud_xgb", json=BODY)
    assert r.status_code == 200 and down.seen == []
    assert r.json() == orjson.loads(ANSWER.model_dump_json())
    assert r.headers["x-request-id"] == "r1"
    assert r.headers["content-type"] == "application/json"
    assert [model for model, _ in served] == ["fraud_xgb"]


@pytest.mark.parametrize(
    ("method", "path", "headers", "content"),
    [
        ("POST", "/predict/fraud_xgb", {"content-type": "application/json"}, b'{"entity_ids": 1}'),
        ("POST", "/predict/fraud_xgb", {"content-type": "application/json"}, b"{not json"),
        ("POST", "/predict/fraud_xgb", {"content-type": "text/plain"}, orjson.dumps(BODY)),
        ("POST", "/predict/fraud_xgb", {}, orjson.dumps(BODY)),
        (
            "POST",
            "/predict/fraud_xgb/async",
            {"content-type": "application/json"},
            orjson.dumps(BODY),
        ),
        ("POST", "/predict/", {"content-type": "application/json"}, orjson.dumps(BODY)),
        ("GET", "/predict/fraud_xgb", {}, b""),
    ],
)
async def test_everything_else_reaches_the_app_with_its_body(
    served: list[tuple[str, PredictRequest]],
    method: str,
    path: str,
    headers: dict[str, str],
    content: bytes,
) -> None:
    down = Downstream()
    async with _client(FastPredict(down, _render)) as client:
        r = await client.request(method, path, headers=headers, content=content)
    assert r.status_code == 299
    assert down.seen == [(path, content)]
    assert served == []


async def test_errors_are_rendered_by_the_apps_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(request: Request) -> None:
        raise Unauthorized("no key")

    monkeypatch.setattr(fast_predict, "authenticated", refuse)
    down = Downstream()
    async with _client(FastPredict(down, _render)) as client:
        r = await client.post("/predict/fraud_xgb", json=BODY)
    assert (r.status_code, r.json()) == (401, {"error": "unauthorized"})
    assert down.seen == []
