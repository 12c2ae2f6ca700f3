"""Async predictions behind the REST door: queue a job in Kafka, read its result.

``POST /predict/{model}/async`` answers 202 only after Kafka confirmed the job (``acks=all``,
idempotent producer): a gateway that crashes afterwards loses nothing. If Kafka does not
confirm within ``enqueue_timeout_s`` the answer is 503 ``enqueue_unavailable`` and the job
counts as not accepted. The model must be in the catalog (404 before anything is queued) and
a callback URL must pass the address check now (422 naming ``callback_url``); workers check
it again before every delivery.

``GET /predict/{model}/async/{token}`` reads the result a worker stored in Redis; see
:mod:`gateway.asyncpred.tokens` for how ``pending`` is told from an unknown job without any write
at submit time. A job is visible only to the API key that submitted it (and to admin keys):
for any other key it is 404 ``job_not_found``, exactly as an unknown or expired token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from fastapi import Request

from gateway.asyncpred.callback_url import (
    CallbackUrlError,
    parse_callback_url,
    parse_networks,
    resolve_callback,
)
from gateway.asyncpred.config import secret_bytes
from gateway.asyncpred.confirmed_producer import ConfirmedProducer, DeliveryFailed
from gateway.asyncpred.metrics import AsyncDoorMetrics
from gateway.asyncpred.results import ResultStore, ResultStoreError
from gateway.asyncpred.schemas import AsyncAccepted, AsyncJob, AsyncPredictRequest, AsyncStatus
from gateway.asyncpred.tokens import NO_OWNER, issue_token, may_be_pending, may_read, read_token
from gateway.auth.guards import PRINCIPAL, is_admin
from gateway.errors import GatewayError, InvalidRequest, NotFound, TryAgainShortly
from gateway.metrics import GatewayMetrics
from gateway.serving.core import result_store_url
from gateway.settings import Settings

log = logging.getLogger(__name__)

TOKEN_SECRET_FILE = "token-secret"


class EnqueueUnavailable(TryAgainShortly):
    """Kafka did not confirm the job: it was not accepted."""

    code = "enqueue_unavailable"


class ResultStoreUnavailable(GatewayError):
    status, code = 503, "result_store_unavailable"


class AsyncJobNotFound(NotFound):
    """No job of this model with this token that the caller may read (or it expired)."""

    code = "job_not_found"


@dataclass(frozen=True)
class Caller:
    """Who polls or submits: ``key_id`` None on a gateway without authentication."""

    key_id: str | None
    is_admin: bool = False

    @property
    def owner(self) -> str:
        return self.key_id if self.key_id is not None else NO_OWNER

    @classmethod
    def of(cls, request: Request, authenticated: bool) -> Caller:
        if not authenticated:
            return cls(None)
        principal = getattr(request.state, PRINCIPAL, None)
        key_id = getattr(principal, "key_id", None)
        return cls(str(key_id) if key_id is not None else NO_OWNER, is_admin(principal))


class AsyncPredictDoor:
    """Per app: the job producer (created on first use), the result store, the token key."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics) -> None:
        self._settings = settings
        self._config = settings.gateway.async_predict
        self._allowed = parse_networks(self._config.allowed_callback_networks)
        self.metrics = AsyncDoorMetrics(metrics.registry)
        self._producer: ConfirmedProducer | None = None
        self._store: ResultStore | None = None
        self._token_key = b""

    async def open(self) -> None:
        """Load (or create) the token secret; clients connect on first use."""
        self._token_key = secret_bytes(
            self._config.token_secret, self._settings.state_dir, TOKEN_SECRET_FILE
        )
        self._store = ResultStore.from_url(
            result_store_url(self._settings), self._config.result_ttl_s
        )

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
        if self._producer is not None:
            await asyncio.to_thread(self._producer.close, 5.0)

    def _jobs(self) -> ConfirmedProducer:
        if self._producer is None:
            self._producer = ConfirmedProducer(
                self._settings.kafka_bootstrap(),
                client_id="rtinfer-async-enqueue",
                timeout_s=self._config.enqueue_timeout_s,
            )
        return self._producer

    async def submit(
        self, model_name: str, body: AsyncPredictRequest, request_id: str, caller: Caller
    ) -> AsyncAccepted:
        if body.callback_url is not None:
            try:
                await resolve_callback(
                    parse_callback_url(body.callback_url),
                    self._allowed,
                    timeout_s=self._config.dns_timeout_s,
                )
            except CallbackUrlError as exc:
                raise InvalidRequest(f"callback_url: {exc}") from None
        token = issue_token(self._token_key, model_name, caller.owner)
        job = AsyncJob(
            job_id=token.job_id,
            token=token.text,
            model_name=model_name,
            request=body.prediction_request(request_id),
            callback_url=body.callback_url,
            submitted_at=time.time(),
            submitted_by=caller.key_id,
        )
        try:
            partition, offset = await self._jobs().send(
                self._config.requests_topic, token.job_id.encode(), job.model_dump_json().encode()
            )
        except DeliveryFailed as exc:
            self.metrics.enqueue_failures.labels(exc.reason).inc()
            ambiguous = " (rarely, it may still run)" if exc.reason == "timeout" else ""
            raise EnqueueUnavailable(
                f"the job was not accepted{ambiguous}: {exc}; submit it again"
            ) from None
        self.metrics.enqueued.labels(model_name).inc()
        log.info(
            "async job accepted",
            extra={
                "fields": {
                    "event": "async_job_accepted",
                    "request_id": request_id,
                    "job_id": token.job_id,
                    "model": model_name,
                    "partition": partition,
                    "offset": offset,
                    "callback": body.callback_url is not None,
                }
            },
        )
        return AsyncAccepted(
            token=token.text,
            model_name=model_name,
            request_id=request_id,
            poll_url=f"/predict/{model_name}/async/{token.text}",
        )

    async def status(self, model_name: str, text: str, caller: Caller) -> AsyncStatus | bytes:
        """The stored result's JSON (as the callback got it), else pending; else 404."""
        token = read_token(self._token_key, model_name, text)
        if token is None or not may_read(token, caller.key_id, caller.is_admin):
            raise AsyncJobNotFound(_not_found(model_name))
        assert self._store is not None
        try:
            stored = await self._store.get(token.job_id)
        except ResultStoreError as exc:
            raise ResultStoreUnavailable(f"the result store is unavailable: {exc}") from None
        if stored is not None:
            return stored
        if may_be_pending(token, self._config.result_ttl_s):
            return AsyncStatus(
                token=text, status="pending", model_name=model_name, submitted_at=token.issued_at
            )
        raise AsyncJobNotFound(_not_found(model_name))


def _not_found(model_name: str) -> str:
    return (
        f"no async job of {model_name} with this token for this API key (unknown, issued for "
        "another key or model, or older than the result TTL)"
    )
