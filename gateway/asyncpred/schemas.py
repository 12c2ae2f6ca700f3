"""Bodies of the async prediction API, and the job message on the ``inference-requests`` topic."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.asyncpred.callback_url import MAX_URL_LENGTH, CallbackUrlError, parse_callback_url
from gateway.schemas import ErrorDetail, PredictRequest, PredictResponse

#: what a poll (and a callback) reports about a job
JobStatus = Literal["pending", "done", "failed"]
JOB_SCHEMA_VERSION = 1


class AsyncPredictRequest(PredictRequest):
    """A prediction request plus where to POST the result when it is ready."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "entity_ids": {"user_id": "u_000042", "merchant_id": "m_00007"},
                    "context": {"amount": 129.99, "hour_of_day": 3, "is_new_device": 1},
                    "callback_url": "https://hooks.example.com/rtinfer",
                }
            ]
        }
    )

    callback_url: str | None = Field(
        None,
        max_length=MAX_URL_LENGTH,
        description="http(s) URL receiving the signed result (X-RTInfer-Signature); must "
        "resolve to public addresses only. Without it, poll the returned URL.",
    )

    @field_validator("callback_url")
    @classmethod
    def _callback_form(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_callback_url(value)
            except CallbackUrlError as exc:
                raise ValueError(str(exc)) from None
        return value

    def prediction_request(self, request_id: str) -> PredictRequest:
        """The request the worker runs: this one without the callback, with its request id."""
        fields = self.model_dump(exclude={"callback_url"})
        fields["request_id"] = request_id
        return PredictRequest.model_validate(fields)


class AsyncAccepted(BaseModel):
    """202: the job is in Kafka; poll ``poll_url`` or wait for the callback."""

    token: str = Field(description="Job token: poll with it; the callback carries it.")
    status: Literal["pending"] = "pending"
    model_name: str
    request_id: str = Field(description="Request id of the prediction (X-Request-ID).")
    poll_url: str = Field(description="GET it for the job's status (also the Location header).")


class AsyncStatus(BaseModel):
    """A job's state; also the body of its callback (then ``done`` or ``failed``)."""

    token: str
    status: JobStatus = Field(
        description="pending: queued or running; done: result holds the prediction; failed: "
        "error says why."
    )
    model_name: str
    request_id: str | None = None
    result: PredictResponse | None = Field(None, description="Same body as the sync predict.")
    error: ErrorDetail | None = None
    submitted_at: float | None = Field(None, description="Unix time the gateway accepted it.")
    completed_at: float | None = Field(None, description="Unix time the result was stored.")


class AsyncJob(BaseModel):
    """The value of one ``inference-requests`` message (JSON); the key is ``job_id``."""

    schema_version: int = JOB_SCHEMA_VERSION
    job_id: str
    token: str
    model_name: str
    request: PredictRequest
    callback_url: str | None = None
    submitted_at: float
    #: API key id of the submitter (None without authentication)
    submitted_by: str | None = None
