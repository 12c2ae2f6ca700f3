"""``POST /predict/{model_name}`` without the framework's per-request layers.

The route in :mod:`gateway.http.predict` defines the door (OpenAPI, behaviour); this ASGI
layer serves the requests it would serve successfully, the same way, without Starlette's
routing, FastAPI's dependency solving and its response wrapper, which cost more CPU than the
prediction itself (docs/benchmarks.md). It takes a request only when the body is a valid
``PredictRequest`` sent as JSON; anything else (another route, another content type, a body
that does not validate) goes down the app unchanged, so every refusal comes from the one
error handler, word for word. Authentication, the prediction service and the response are
the route's own functions.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth.guards import authenticated
from gateway.http.ingress import replay_body
from gateway.http.predict import serve_prediction
from gateway.schemas import PredictRequest

#: the route's path (``{model_name}`` is one path segment, as Starlette matches it)
PREDICT_PATH = re.compile(r"/predict/(?P<model>[^/]+)")

#: renders an exception as the app's error handler does
ErrorRenderer = Callable[[Request, Exception], Awaitable[Response]]


def _json_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


class FastPredict:
    """Serves valid ``POST /predict/{model}`` requests directly; everything else goes on."""

    def __init__(self, app: ASGIApp, render_error: ErrorRenderer) -> None:
        self.app = app
        self.render_error = render_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = (
            PREDICT_PATH.fullmatch(scope["path"])
            if scope["type"] == "http" and scope["method"] == "POST"
            else None
        )
        if match is None or not _json_body(scope):
            await self.app(scope, receive, send)
            return
        body, receive = await _read_body(receive)
        try:
            parsed = PredictRequest.model_validate_json(body)
        except ValidationError:  # the route refuses it, in its own words
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            await authenticated(request)
            result, headers = await serve_prediction(request, match["model"], parsed)
        except Exception as exc:
            response = await self.render_error(request, exc)
            await response(scope, receive, send)
            return
        await _send_json(send, result.model_dump_json().encode(), headers)


async def _read_body(receive: Receive) -> tuple[bytes, Receive]:
    """The body, and a receive that hands it over again (to the app, if it goes on).
    :class:`~gateway.http.ingress.IngressMiddleware`, outside this layer, has already read it
    whole and hands it over in one message."""
    message = await receive()
    body = message.get("body", b"") if message["type"] == "http.request" else b""
    return body, replay_body(body, receive)


async def _send_json(send: Send, content: bytes, headers: dict[str, str]) -> None:
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(content)),
        *((k.lower().encode(), v.encode()) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": raw})
    await send({"type": "http.response.body", "body": content})
