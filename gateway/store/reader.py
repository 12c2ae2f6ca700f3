"""The gateway's reads of the store, off the event loop; connects on first use."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from gateway.errors import GatewayError, NotFound
from gateway.store import queries
from gateway.store.backend import Store, StoreError, open_store


class StoreUnavailable(GatewayError):
    status, code = 503, "store_unavailable"


class PredictionNotFound(NotFound):
    code = "prediction_not_found"


class StoreReader:
    def __init__(self, url: str, timeout_s: float) -> None:
        self._url, self._timeout_s = url, timeout_s
        self._store: Store | None = None
        self._lock = threading.Lock()

    def _open(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = open_store(self._url, timeout_s=self._timeout_s)
            return self._store

    async def show(self, request_id: str) -> dict[str, Any]:
        def read() -> dict[str, Any] | None:
            return queries.show(self._open(), request_id)

        try:
            found = await asyncio.to_thread(read)
        except StoreError as exc:
            raise StoreUnavailable(f"the prediction store did not answer: {exc}") from None
        if found is None:
            raise PredictionNotFound(
                f"no prediction or label with request_id {request_id!r} in the store (a "
                "prediction is stored about a second after it was served)"
            )
        return found

    async def close(self) -> None:
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
