"""The async REST door: ``POST /predict/{model}/async`` (202 + token) and its poll.

The work behind both routes is :class:`gateway.asyncpred.door.AsyncPredictDoor`, one per app
(``app.state.async_predict``).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from gateway.asyncpred.door import AsyncPredictDoor, Caller
from gateway.asyncpred.schemas import AsyncAccepted, AsyncPredictRequest, AsyncStatus
from gateway.auth.guards import auth_configured, authenticated
from gateway.http.context import error_responses, model_entry, runtime
from gateway.http.predict import request_id_of
from gateway.responses import OrjsonResponse
from gateway.schemas import REQUEST_ID_HEADER

router = APIRouter()


def _door(request: Request) -> AsyncPredictDoor:
    return request.app.state.async_predict  # type: ignore[no-any-return]


@router.post(
    "/predict/{model_name}/async",
    status_code=202,
    response_model=AsyncAccepted,
    responses=error_responses(401, 404, 413, 422, 429, 503),
    dependencies=[Depends(authenticated)],
    summary="Queue one prediction; the result is polled or POSTed to callback_url",
    description="202 once Kafka confirmed the job (Location: the poll URL). The result "
    "has the body of the sync predict. Callbacks are signed (X-RTInfer-Signature, see "
    "docs/gateway.md) and delivered at least once. 503 enqueue_unavailable: not accepted.",
)
async def submit(model_name: str, body: AsyncPredictRequest, request: Request) -> Response:
    request_id = request_id_of(request, body.request_id)
    model_entry(runtime(request), model_name)  # 404/503 before anything is queued
    caller = Caller.of(request, auth_configured(request))
    accepted = await _door(request).submit(model_name, body, request_id, caller)
    return OrjsonResponse(
        accepted.model_dump(),
        status_code=202,
        headers={"Location": accepted.poll_url, REQUEST_ID_HEADER: request_id},
    )


@router.get(
    "/predict/{model_name}/async/{token}",
    response_model=AsyncStatus,
    responses=error_responses(401, 404, 429, 503),
    dependencies=[Depends(authenticated)],
    summary="Status and result of an async prediction",
    description="pending, done (result as the sync predict's body) or failed (error). "
    "404 job_not_found: not a token issued for this model, issued to another API key "
    "(admin keys read every job), or older than the result TTL.",
)
async def poll(model_name: str, token: str, request: Request) -> Response:
    caller = Caller.of(request, auth_configured(request))
    found = await _door(request).status(model_name, token, caller)
    if isinstance(found, bytes):
        return Response(found, media_type="application/json")
    return OrjsonResponse(found.model_dump())
