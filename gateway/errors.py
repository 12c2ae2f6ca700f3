"""Typed errors carrying an HTTP status and a stable code, and the one handler rendering them.

Every error response has the body ``{"error": {"code": ..., "message": ...}}``. Client
mistakes (malformed JSON, wrong types, unknown fields, non-finite numbers, oversized bodies)
are 4xx; an unexpected exception is the only source of a 500.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gateway.responses import OrjsonResponse
from gateway.schemas import REQUEST_ID_HEADER, valid_request_id

log = logging.getLogger(__name__)

#: validation problems listed in one message; the rest are counted
MAX_LISTED_PROBLEMS = 10


class GatewayError(Exception):
    """Base of every error the gateway returns to a client."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        #: set once the per-request log line for this error has been written
        self.logged = False
        #: raised again without calling upstream (``gateway.serving.endpoint_guard``)
        self.failed_fast = False

    @property
    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(GatewayError):
    status, code = 422, "invalid_request"


class Unauthorized(GatewayError):
    status, code = 401, "unauthorized"


class Forbidden(GatewayError):
    """Authenticated, but not allowed to do this."""

    status, code = 403, "forbidden"


class AdminRequired(Forbidden):
    code = "admin_required"


class Conflict(GatewayError):
    """The change conflicts with the current state (e.g. an existing catalog row)."""

    status, code = 409, "conflict"


class NotFound(GatewayError):
    status, code = 404, "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status, code = 405, "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status, code = 413, "payload_too_large"


class RateLimited(GatewayError):
    status, code = 429, "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class TryAgainShortly(GatewayError):
    """503 with ``Retry-After: 1``: a dependency did not confirm; nothing was accepted."""

    status = 503

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class InternalError(GatewayError):
    status, code = 500, "internal_error"


class UpstreamFailure(GatewayError):
    """Triton could not answer in time; a deployment's fallback may serve instead.

    ``reason`` names the failure in ``degraded_reason`` (``<reason>:<fallback type>``).
    """

    reason: ClassVar[str] = "upstream_failure"


class UpstreamUnavailable(UpstreamFailure):
    status, code = 503, "upstream_unavailable"
    reason = "triton_unavailable"


class ModelNotReady(UpstreamUnavailable):
    code = "model_not_ready"
    reason = "model_not_ready"


class UpstreamOverloaded(UpstreamUnavailable):
    code = "upstream_overloaded"
    reason = "triton_overloaded"


class GatewayOverloaded(UpstreamUnavailable):
    """This worker has ``max_in_flight`` predictions in progress: shed to the fallback at once
    rather than queue behind them (and cancel them all at their deadlines)."""

    code = "gateway_overloaded"
    reason = "gateway_overloaded"


class UpstreamError(UpstreamUnavailable):
    code = "upstream_error"
    reason = "triton_error"


class DeadlineExceeded(UpstreamFailure):
    status, code = 504, "deadline_exceeded"
    reason = "deadline_exceeded"


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """One line naming each offending field, e.g. ``context.amount: Input should be ...``."""
    problems = []
    for err in errors:
        loc = [str(part) for part in err.get("loc", ()) if part != "[key]"]
        if loc and loc[0] in ("body", "path", "query", "header"):
            where = loc[0]
            loc = loc[1:]
        else:
            where = "body"
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "invalid JSON")
            position = f" at position {loc[0]}" if loc else ""
            problems.append(f"request body is not valid JSON: {detail}{position}")
            continue
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "value_error":
            msg = msg.removeprefix("Value error, ")
        problems.append(f"{'.'.join(loc) or where}: {msg}")
    listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    if len(problems) > MAX_LISTED_PROBLEMS:
        listed += f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)"
    return listed or "invalid request"


def as_gateway_error(exc: Exception) -> GatewayError:
    """The typed error for any exception reaching the HTTP layer."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, RequestValidationError):
        return InvalidRequest(describe_validation_errors(exc.errors()))
    if isinstance(exc, StarletteHTTPException):
        detail = str(exc.detail)
        if exc.status_code == 400:
            # FastAPI's only 400: a body json.loads cannot read (bad UTF-8, over-long integer)
            cause = exc.__cause__
            return InvalidRequest(f"request body is not valid JSON: {cause or detail}")
        if exc.status_code == 404:
            return NotFound(detail)
        if exc.status_code == 405:
            return MethodNotAllowed(detail)
        if exc.status_code == 413:
            return PayloadTooLarge(detail)
    return InternalError("internal error")


def error_response(err: GatewayError, request_id: str | None = None) -> Response:
    headers = dict(err.headers)
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return OrjsonResponse(
        {"error": {"code": err.code, "message": err.message}},
        status_code=err.status,
        headers=headers,
    )


def install_error_handler(
    app: FastAPI, on_error: Callable[[GatewayError], None] | None = None
) -> Callable[[Request, Exception], Awaitable[Response]]:
    """Render every exception (typed, validation, routing, unexpected) the same way; the
    handler is returned for ASGI layers in front of the app's routing."""

    async def handle(request: Request, exc: Exception) -> Response:
        err = as_gateway_error(exc)
        request_id = getattr(request.state, "request_id", None) or valid_request_id(
            request.headers.get(REQUEST_ID_HEADER)
        )
        if isinstance(err, InternalError):
            log.error(
                "unhandled error on %s %s",
                request.method,
                request.url.path,
                exc_info=exc,
                extra={"fields": {"request_id": request_id}},
            )
        elif not err.logged:
            log.info(
                "request rejected",
                extra={
                    "fields": {
                        "request_id": request_id,
                        "method": request.method,
                        "path": request.url.path,
                        "status": err.status,
                        "code": err.code,
                        "message": err.message,
                    }
                },
            )
        if on_error is not None:
            on_error(err)
        return error_response(err, request_id)

    for exc_type in (GatewayError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handle)
    return handle
