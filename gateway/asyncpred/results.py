"""Results of async predictions in Redis, written by workers and read by polls.

Key schema (both keys expire after ``result_ttl_s``):

* ``rtinfer:async:result:<job id>``: the job's final :class:`AsyncStatus` as JSON (``done``
  or ``failed``), byte for byte the body of its callback. Written with ``SET NX``: the first
  worker to finish a job wins, a redelivered copy reads and reuses that result.
* ``rtinfer:async:settled:<job id>``: ``1`` once the job's callback was delivered or the job
  dead-lettered; a redelivered job that finds it does nothing at all.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

RESULT_PREFIX = "rtinfer:async:result:"
SETTLED_PREFIX = "rtinfer:async:settled:"


class ResultStoreError(RuntimeError):
    """Redis did not answer (or answered with an error)."""


class ResultStore:
    """One shared ``redis.asyncio`` client with explicit socket timeouts."""

    def __init__(self, client: aioredis.Redis, ttl_s: int) -> None:
        self._client = client
        self.ttl_s = ttl_s

    @classmethod
    def from_url(cls, url: str, ttl_s: int, timeout_s: float = 2.0) -> ResultStore:
        client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        return cls(client, ttl_s)

    async def close(self) -> None:
        await self._client.aclose()

    async def get(self, job_id: str) -> bytes | None:
        """The stored result body, or None."""
        return await self._call(self._client.get(RESULT_PREFIX + job_id))  # type: ignore[no-any-return]

    async def put_if_absent(self, job_id: str, body: bytes) -> tuple[bytes, bool]:
        """Store ``body`` unless a result is stored; return (the stored body, whether ours)."""
        key = RESULT_PREFIX + job_id
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(key, body, nx=True, ex=self.ttl_s)
            pipe.get(key)
            created, stored = await self._call(pipe.execute())
        return (stored if stored is not None else body), bool(created)

    async def is_settled(self, job_id: str) -> bool:
        return bool(await self._call(self._client.exists(SETTLED_PREFIX + job_id)))

    async def mark_settled(self, job_id: str) -> None:
        await self._call(self._client.set(SETTLED_PREFIX + job_id, b"1", ex=self.ttl_s))

    async def ping(self) -> bool:
        return bool(await self._call(self._client.ping()))  # type: ignore[misc]

    @staticmethod
    async def _call(awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise ResultStoreError(f"redis: {type(exc).__name__}: {exc}") from exc
