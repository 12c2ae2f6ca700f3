"""The production ``authenticate`` hook: API key (Postgres, cached) then per-key rate limit (Redis).

``ApiKeyGuard`` is what ``create_app`` installs when ``gateway.auth = "api_key"``. It is built
with the app (nothing connects) and opened/closed by the app's lifespan. The authenticated
:class:`~gateway.auth.keys.ApiKey` is left on ``request.state.principal`` for the routes (admin
checks) and the logs.
"""

from __future__ import annotations

from fastapi import Request

from gateway.auth.credentials import ApiKey
from gateway.auth.keys import ApiKeyAuthenticator
from gateway.auth.ratelimit import RedisRateLimiter

PRINCIPAL = "principal"


class ApiKeyGuard:
    """Authenticate, then take one token from the key's bucket; raises typed 401/429/503."""

    def __init__(self, authenticator: ApiKeyAuthenticator, limiter: RedisRateLimiter) -> None:
        self.authenticator = authenticator
        self.limiter = limiter

    @classmethod
    def connect(
        cls,
        conninfo: str,
        redis_url: str,
        *,
        cache_ttl_s: float = 60.0,
        burst_multiplier: float = 2.0,
        lease_s: float = 0.0,
    ) -> ApiKeyGuard:
        return cls(
            ApiKeyAuthenticator(conninfo, cache_ttl_s=cache_ttl_s),
            RedisRateLimiter.from_url(
                redis_url, burst_multiplier=burst_multiplier, lease_s=lease_s
            ),
        )

    async def __call__(self, request: Request) -> ApiKey:
        key = await self.authenticator.authenticate(request.headers)
        setattr(request.state, PRINCIPAL, key)
        await self.limiter.enforce(key.key_id, key.rate_limit_per_s)
        return key

    async def open(self) -> None:
        await self.authenticator.open()

    async def close(self) -> None:
        await self.authenticator.close()
        await self.limiter.close()
