"""Deterministic Redis key schema of the online feature store.

One Redis hash per entity, ``{prefix}:{entity_type}:{entity_id}``, whose fields are the
feature names of that entity's group, e.g. ``HGET features:user:u_000123 user_txn_count_24h``.
"""

from __future__ import annotations

DEFAULT_KEY_PREFIX = "features"


def entity_key(entity_type: str, entity_id: str, prefix: str = DEFAULT_KEY_PREFIX) -> str:
    """Redis key of one entity's feature hash, e.g. ``features:user:u_000123``."""
    return f"{prefix}:{entity_type}:{entity_id}"
