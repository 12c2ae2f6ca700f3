"""Ground truth and stored predictions: ``POST /feedback`` and ``GET /predictions/{id}``.

The work is done by :class:`gateway.store.feedback.FeedbackDoor` (``app.state.feedback``) and
:class:`gateway.store.reader.StoreReader` (``app.state.store_reader``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request

from gateway.auth.guards import AdminFor, authenticated
from gateway.http.context import error_responses
from gateway.store.feedback import MAX_LABELS, Feedback, FeedbackAccepted, FeedbackDoor
from gateway.store.reader import StoreReader

router = APIRouter()
prediction_admin = AdminFor("reading stored predictions")

LabelBody = Annotated[
    Feedback | Annotated[list[Feedback], Body(min_length=1, max_length=MAX_LABELS)],
    Body(description=f"One label, or a JSON array of up to {MAX_LABELS}."),
]


@router.post(
    "/feedback",
    status_code=202,
    response_model=FeedbackAccepted,
    responses=error_responses(401, 413, 422, 429, 503),
    dependencies=[Depends(authenticated)],
    summary="Ground-truth labels of served predictions (one, or a batch)",
    description="202 once Kafka confirmed every label of the body (acks=all). A label "
    "replaces an earlier one of the same request_id and source, so sending again is safe. "
    "Labels of requests the store has not seen yet are kept and join later. 503 "
    "feedback_unavailable: not accepted, send again.",
)
async def feedback(body: LabelBody, request: Request) -> FeedbackAccepted:
    door: FeedbackDoor = request.app.state.feedback
    return await door.submit(body if isinstance(body, list) else [body])


@router.get(
    "/predictions/{request_id}",
    responses=error_responses(401, 403, 404, 429, 503),
    dependencies=[Depends(authenticated), Depends(prediction_admin)],
    summary="A served prediction as stored: its records (production, shadows) and labels",
    description="From the prediction store, about a second after the prediction was served. "
    "records: production/canary/direct first, then shadow records; labels: every source's.",
)
async def stored_prediction(request_id: str, request: Request) -> dict[str, Any]:
    reader: StoreReader = request.app.state.store_reader
    return await reader.show(request_id)
