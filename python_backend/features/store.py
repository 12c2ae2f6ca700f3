"""Redis online store: one pipelined round trip of ``HMGET`` per batch of entity keys."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

#: Raw hash values of one entity in the order of its group's fields (``None``: no such field).
RawValues = list[bytes | None]


class FeatureStoreUnavailable(Exception):
    """The online store could not answer (connection refused, timeout, server error)."""


class RedisFeatureStore:
    """Reads entity hashes from Redis.

    ``fields_by_group`` maps a feature group (``user``, ``merchant``) to the hash fields read
    for its entities, in the order the caller wants the values back.
    """

    def __init__(self, client: Any, fields_by_group: Mapping[str, Sequence[str]]) -> None:
        if not fields_by_group or any(not fields for fields in fields_by_group.values()):
            raise ValueError("fields_by_group needs at least one field per group")
        self._client = client
        self._fields = {group: list(fields) for group, fields in fields_by_group.items()}
        #: pipelines sent to Redis, successful or not
        self.round_trips = 0
        #: single HMGETs the server answered with an error (e.g. WRONGTYPE)
        self.key_errors = 0

    @property
    def fields_by_group(self) -> dict[str, list[str]]:
        return {group: list(fields) for group, fields in self._fields.items()}

    def fetch(self, lookups: Sequence[tuple[str, str]]) -> dict[str, RawValues]:
        """Read the hashes of ``(group, key)`` pairs in one pipelined round trip.

        Returns the raw values per distinct key. A key that does not exist comes back as all
        ``None``. Raises :class:`FeatureStoreUnavailable` if Redis cannot be reached or fails.
        """
        keys: dict[str, list[str]] = {}
        for group, key in lookups:
            if key not in keys:
                try:
                    keys[key] = self._fields[group]
                except KeyError:
                    raise ValueError(f"unknown feature group {group!r}") from None
        if not keys:
            return {}
        self.round_trips += 1
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for key, fields in keys.items():
                    pipe.hmget(key, fields)
                replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        if len(replies) != len(keys):
            raise FeatureStoreUnavailable(
                f"redis pipeline returned {len(replies)} replies for {len(keys)} commands"
            )
        values: dict[str, RawValues] = {}
        for (key, fields), reply in zip(keys.items(), replies, strict=True):
            if isinstance(reply, Exception):
                # A broken hash (e.g. WRONGTYPE) is that entity's problem, not the store's:
                # treat it as missing rather than failing every request of the batch.
                self.key_errors += 1
                logger.warning("HMGET %s failed: %s", key, reply)
                values[key] = [None] * len(fields)
            else:
                values[key] = reply
        return values


def redis_client_from_url(url: str, timeout_ms: float) -> redis.Redis:
    """A Redis client that fails fast: one attempt, ``timeout_ms`` to connect and to answer.

    No retries and no health-check pings, so a dead Redis costs at most one timeout per call
    before the circuit breaker opens.
    """
    if timeout_ms <= 0:
        raise ValueError("timeout_ms must be positive")
    timeout_s = timeout_ms / 1000.0
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry_on_timeout=False,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        decode_responses=False,
    )
