"""One deployment of a model, as the catalog's ``model_deployments`` table holds it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.catalog.fallback import ClassPriorFallback, parse_fallback

#: the ``model_deployments`` columns ``Deployment.from_row`` reads, in its order
DEPLOYMENT_COLUMNS = (
    "deployment_id, model_name, model_version, serving_endpoint, traffic_pct, "
    "feature_groups, fallback_config, is_shadow, shadow_sample_pct, deployed_at"
)


@dataclass(frozen=True)
class Deployment:
    """One active catalog row."""

    deployment_id: int
    model_name: str
    model_version: str
    serving_endpoint: str
    traffic_pct: float
    feature_groups: tuple[str, ...] = ()
    fallback: ClassPriorFallback | None = None
    is_shadow: bool = False
    shadow_sample_pct: float = 100.0
    deployed_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Deployment:
        (dep_id, model, version, endpoint, traffic, groups, fallback, shadow, sample, at) = row
        return cls(
            deployment_id=int(dep_id),
            model_name=model,
            model_version=version,
            serving_endpoint=endpoint,
            traffic_pct=float(traffic),
            feature_groups=tuple(str(g) for g in groups),
            fallback=parse_fallback(fallback, where=f"deployment {dep_id} ({model})"),
            is_shadow=bool(shadow),
            shadow_sample_pct=float(sample),
            deployed_at=at,
        )
