"""The outermost ASGI layer: arrival time and the request body size limit.

A declared ``Content-Length`` above the limit is refused before reading anything; otherwise
the body is read (chunked bodies included) until it passes the limit, then refused with 413,
or handed to the app in one piece. Prediction bodies are small, and FastAPI reads the whole
body anyway, so buffering it here costs nothing extra.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError, PayloadTooLarge, error_response

#: key of ``request.state`` holding the ``time.perf_counter()`` of arrival
RECEIVED_AT = "received_at"


class IngressMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        on_error: Callable[[GatewayError], None] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})[RECEIVED_AT] = time.perf_counter()
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(scope, receive, send, f"{declared} bytes declared")
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(scope, receive, send, "body exceeds it")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        await self.app(scope, replay_body(b"".join(chunks), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, detail: str) -> None:
        err = PayloadTooLarge(
            f"request body larger than the {self.max_body_bytes}-byte limit ({detail})"
        )
        if self.on_error is not None:
            self.on_error(err)
        await error_response(err)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the buffered body once, then defers to the server."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
