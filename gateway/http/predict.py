"""``POST /predict/{model_name}``: score one transaction through the prediction service."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from gateway.auth.guards import authenticated
from gateway.http.context import error_responses, runtime
from gateway.http.ingress import RECEIVED_AT
from gateway.responses import OrjsonResponse
from gateway.schemas import (
    DEGRADED_HEADER,
    REQUEST_ID_HEADER,
    PredictRequest,
    PredictResponse,
    new_request_id,
    valid_request_id,
)

router = APIRouter()


def request_id_of(request: Request, body_request_id: str | None) -> str:
    """The body's request id, else a valid ``X-Request-ID`` header, else a new one; left on
    ``request.state`` for the access log."""
    request_id = (
        body_request_id
        or valid_request_id(request.headers.get(REQUEST_ID_HEADER))
        or new_request_id()
    )
    request.state.request_id = request_id
    return request_id


@router.post(
    "/predict/{model_name}",
    response_model=PredictResponse,
    responses=error_responses(401, 404, 413, 422, 429, 503, 504),
    dependencies=[Depends(authenticated)],
    summary="Score one transaction with a catalog model",
    description=f"Routes to the user's sticky traffic arm. Response headers: "
    f"`{REQUEST_ID_HEADER}` (echoed or generated), `{DEGRADED_HEADER}: true` when degraded. "
    "When Triton is unavailable, the model not ready or the deadline spent, a deployment "
    "with a fallback_config answers 200 with its fallback (degraded) instead of 503/504.",
)
async def predict(model_name: str, body: PredictRequest, request: Request) -> Response:
    result, headers = await serve_prediction(request, model_name, body)
    return OrjsonResponse(result.model_dump(), headers=headers)


async def serve_prediction(
    request: Request, model_name: str, body: PredictRequest
) -> tuple[PredictResponse, dict[str, str]]:
    """The route's work once the caller is authenticated: the prediction and its headers
    (also served by :mod:`gateway.http.fast_predict`)."""
    request_id = request_id_of(request, body.request_id)
    result = await runtime(request).service.predict(
        model_name,
        body,
        request_id=request_id,
        received_at=getattr(request.state, RECEIVED_AT, None),
    )
    headers = {REQUEST_ID_HEADER: request_id}
    if result.degraded:
        headers[DEGRADED_HEADER] = "true"
    return result, headers
