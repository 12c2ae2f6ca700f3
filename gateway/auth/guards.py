"""Route dependencies that authenticate callers and guard catalog writes.

The app factory installs one :class:`AuthHook` per app (:func:`install_auth`); the
dependencies below read it from the request's app, so every router is a plain module-level
one shared by all apps.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request

from gateway.errors import AdminRequired
from gateway.metrics import GatewayMetrics

#: Authenticates (and may rate-limit) a request before any catalog or prediction route runs.
#: Raises ``gateway.errors.Unauthorized`` / ``RateLimited``; returns the principal (e.g. a
#: ``gateway.auth.keys.ApiKey``), which the routes leave on ``request.state.principal``.
#: Catalog writes need a principal whose ``is_admin`` is true, else 403.
Authenticate = Callable[[Request], Awaitable[object]]

#: where the routes leave the authenticated principal (``None`` without authentication)
PRINCIPAL = "principal"


def is_admin(principal: object) -> bool:
    """Whether an authenticated principal may change the catalog."""
    return getattr(principal, "is_admin", False) is True


@dataclass(frozen=True)
class AuthHook:
    """How one app authenticates: ``authenticate`` ``None`` means no authentication."""

    metrics: GatewayMetrics
    authenticate: Authenticate | None


def install_auth(app: FastAPI, metrics: GatewayMetrics, authenticate: Authenticate | None) -> None:
    app.state.auth = AuthHook(metrics, authenticate)


def auth_configured(request: Request) -> bool:
    """Whether this request's app authenticates callers."""
    return _hook(request).authenticate is not None


def _hook(request: Request) -> AuthHook:
    return request.app.state.auth  # type: ignore[no-any-return]


async def authenticated(request: Request) -> object:
    """The authenticated principal, left on ``request.state``; ``None`` without
    authentication."""
    hook = _hook(request)
    if hook.authenticate is None:
        return None
    started = time.perf_counter()
    try:
        principal = await hook.authenticate(request)
    finally:
        hook.metrics.stage_seconds.labels("auth").observe(time.perf_counter() - started)
    setattr(request.state, PRINCIPAL, principal)
    return principal


class AdminFor:
    """A route dependency for catalog writes: any caller without authentication, else an
    admin key (401 without a key, 403 ``admin_required`` for another key). ``what`` names the
    change in the refusal, e.g. "changing shadow deployments"."""

    def __init__(self, what: str) -> None:
        self.what = what

    async def __call__(self, request: Request) -> None:
        principal = await authenticated(request)
        if auth_configured(request) and not is_admin(principal):
            key_id = getattr(principal, "key_id", None)
            raise AdminRequired(
                f"{self.what} requires an admin API key"
                + (f"; key {key_id} is not an admin" if key_id else "")
            )


def actor_of(request: Request) -> str | None:
    """Who made a catalog change, for its history row: the API key id, if any."""
    key_id = getattr(getattr(request.state, PRINCIPAL, None), "key_id", None)
    return str(key_id) if key_id is not None else None
