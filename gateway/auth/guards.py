"""Route dependencies that authenticate callers and guard catalog writes."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request

from gateway.errors import AdminRequired
from gateway.http.deps import Authenticate, is_admin
from gateway.metrics import GatewayMetrics

#: where the routes leave the authenticated principal (``None`` without authentication)
PRINCIPAL = "principal"


def auth_guard(
    metrics: GatewayMetrics, authenticate: Authenticate | None
) -> Callable[[Request], Awaitable[object]]:
    """A route dependency leaving the authenticated principal on ``request.state``."""

    async def auth(request: Request) -> object:
        """The authenticated principal; ``None`` when no authentication is configured."""
        if authenticate is None:
            return None
        started = time.perf_counter()
        try:
            principal = await authenticate(request)
        finally:
            metrics.stage_seconds.labels("auth").observe(time.perf_counter() - started)
        setattr(request.state, PRINCIPAL, principal)
        return principal

    return auth


def admin_guard(
    metrics: GatewayMetrics, authenticate: Authenticate | None, what: str
) -> Callable[[Request], Awaitable[None]]:
    """A route dependency for catalog writes: any caller without authentication, else an
    admin key (401 without a key, 403 ``admin_required`` for another key). ``what`` names the
    change in the refusal, e.g. "changing shadow deployments"."""
    auth = auth_guard(metrics, authenticate)

    async def admin(request: Request) -> None:
        principal = await auth(request)
        if authenticate is not None and not is_admin(principal):
            key_id = getattr(principal, "key_id", None)
            raise AdminRequired(
                f"{what} requires an admin API key"
                + (f"; key {key_id} is not an admin" if key_id else "")
            )

    return admin


def actor_of(request: Request) -> str | None:
    """Who made a catalog change, for its history row: the API key id, if any."""
    key_id = getattr(getattr(request.state, PRINCIPAL, None), "key_id", None)
    return str(key_id) if key_id is not None else None
