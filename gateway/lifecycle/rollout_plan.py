"""What the MLflow registry asks for: the action of one registry state (a new version, an alias
set) and the plan of a reconcile pass; pure functions, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.catalog.rollout_store import CREATED, AppliedState, alias_kind
from gateway.lifecycle.config import LifecycleSettings
from gateway.lifecycle.deployer import Mode
from gateway.lifecycle.mlflow_registry import ModelListing

TRAFFIC_PCT_TAG = "rtinfer.traffic_pct"


SHADOW_SAMPLE_TAG = "rtinfer.shadow_sample_pct"


#: alias -> what assigning it to a version does
ALIAS_MODES: Mapping[str, Mode] = {
    "champion": "promote",
    "canary": "canary",
    "challenger": "shadow",
}


@dataclass(frozen=True)
class Action:
    """What one registry state asks for; ``mode`` None = nothing, ``reason`` says why."""

    model: str
    version: int
    kind: str
    mode: Mode | None
    traffic_pct: float | None = None
    reason: str = ""


def _pct(tags: Mapping[str, str], tag: str, default: float, *, upper_inclusive: bool) -> float:
    raw = tags.get(tag)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    ok = 0 < value <= 100 if upper_inclusive else 0 < value < 100
    if not ok:
        bound = "(0, 100]" if upper_inclusive else "(0, 100)"
        raise ValueError(f"version tag {tag}={raw!r} is not a percentage in {bound}")
    return value


def action_for(
    lifecycle: LifecycleSettings,
    model: str,
    version: int,
    alias: str | None,
    tags: Mapping[str, str],
) -> Action:
    """The alias convention: what version ``version`` of ``model`` gets, given the event."""
    kind = CREATED if alias is None else alias_kind(alias)
    if model not in lifecycle.managed_models:
        return Action(model, version, kind, None, reason=f"{model} is not a managed model")
    if alias is None:
        if lifecycle.on_register == "none":
            return Action(model, version, kind, None, reason="lifecycle.on_register is none")
        mode: Mode = lifecycle.on_register
    elif alias in ALIAS_MODES:
        mode = ALIAS_MODES[alias]
    else:
        return Action(model, version, kind, None, reason=f"alias {alias!r} has no rollout role")
    try:
        if mode == "canary":
            pct = _pct(tags, TRAFFIC_PCT_TAG, lifecycle.canary_pct, upper_inclusive=False)
        elif mode == "shadow":
            pct = _pct(tags, SHADOW_SAMPLE_TAG, 100.0, upper_inclusive=True)
        else:
            return Action(model, version, kind, mode)
    except ValueError as exc:
        return Action(model, version, kind, None, reason=str(exc))
    return Action(model, version, kind, mode, traffic_pct=pct)


@dataclass(frozen=True)
class Pending:
    """A registry state the applied record does not hold yet."""

    model: str
    kind: str
    #: the version created or aliased; None for an alias that is gone
    version: int | None
    #: set when the state is recorded without a deploy ("superseded", "alias_deleted")
    record_only: str | None = None


def _alias_order(alias: str) -> tuple[int, str]:
    order = list(ALIAS_MODES)
    return (order.index(alias) if alias in order else len(order), alias)


def plan_reconcile(listings: Iterable[ModelListing], applied: AppliedState) -> list[Pending]:
    """What the registry holds that ``applied`` does not, in the order to apply it.

    Per model: the newest version's creation, older unhandled versions as superseded, then
    alias assignments that differ from their newest record (champion, canary, challenger,
    then others), then aliases recorded but no longer in the registry.
    """
    out: list[Pending] = []
    for listing in listings:
        model = listing.model
        done = applied.created.get(model, frozenset())
        if listing.versions:
            newest = max(listing.versions)
            for version in sorted(set(listing.versions) - done):
                superseded = version < newest or version < max(done, default=0)
                out.append(Pending(model, CREATED, version, "superseded" if superseded else None))
        for alias in sorted(listing.aliases, key=_alias_order):
            version = listing.aliases[alias]
            if applied.aliases.get((model, alias)) != version:
                out.append(Pending(model, alias_kind(alias), version))
        for (recorded_model, alias), version in sorted(applied.aliases.items()):
            if recorded_model == model and version is not None and alias not in listing.aliases:
                out.append(Pending(model, alias_kind(alias), None, "alias_deleted"))
    return out
