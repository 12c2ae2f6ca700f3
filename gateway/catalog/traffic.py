"""Canary traffic split: a sticky, weighted choice among a model's traffic arms.

The arms are the model's active, non-shadow deployments with ``traffic_pct > 0``, ordered by
``deployment_id``; each owns a slice of [0, 100) proportional to its ``traffic_pct`` (weights
need not add up to 100). A user's point in that range is a hash of model name and user id, so
the same user always lands on the same arm while the weights stay the same, and raising a
canary's share only moves users from the other arms to it. The arm with the largest share
(the oldest on a tie) is ``prod``; every other arm is a ``canary``. Shadow deployments are not
arms: they never answer a request.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.catalog.records import Deployment
from gateway.schemas import Arm, DeploymentRole

_HASH_RANGE = float(2**64)


def sticky_bucket(model_name: str, user_id: str) -> float:
    """Deterministic point in [0, 100) for a user of a model."""
    digest = hashlib.blake2b(f"{model_name}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_RANGE * 100.0


@dataclass(frozen=True)
class Route:
    deployment: Deployment
    arm: Arm


@dataclass(frozen=True)
class RoutingTable:
    """The traffic split of one model, built once per catalog snapshot."""

    routes: tuple[Route, ...]
    #: upper end of each route's slice, in traffic_pct units
    bounds: tuple[float, ...]

    @classmethod
    def build(cls, deployments: Iterable[Deployment]) -> RoutingTable:
        arms = sorted(
            (d for d in deployments if not d.is_shadow and d.traffic_pct > 0),
            key=lambda d: d.deployment_id,
        )
        if not arms:
            return cls((), ())
        prod = min(arms, key=lambda d: (-d.traffic_pct, d.deployment_id))
        routes = tuple(Route(d, "prod" if d is prod else "canary") for d in arms)
        return cls(routes, tuple(itertools.accumulate(d.traffic_pct for d in arms)))

    def choose(self, model_name: str, user_id: str) -> Route | None:
        """The user's arm; ``None`` when no deployment receives traffic."""
        if not self.routes:
            return None
        point = sticky_bucket(model_name, user_id) / 100.0 * self.bounds[-1]
        index = bisect.bisect_right(self.bounds, point)
        return self.routes[min(index, len(self.routes) - 1)]

    def role(self, deployment: Deployment) -> DeploymentRole:
        if deployment.is_shadow:
            return "shadow"
        for route in self.routes:
            if route.deployment.deployment_id == deployment.deployment_id:
                return route.arm
        return "idle"
