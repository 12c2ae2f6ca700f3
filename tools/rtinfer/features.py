"""Seed the online feature store (Redis hashes keyed by the assembler's key schema)."""

from __future__ import annotations

from collections.abc import Iterable

import redis

from python_backend.features.keys import entity_key
from rtinfer.demo.dataset import entity_feature_rows, generate_entities

BATCH = 1_000


def load_rows(
    client: redis.Redis,
    rows: Iterable[tuple[str, str, dict[str, str]]],
    prefix: str = "features",
) -> int:
    """HSET each (entity_type, entity_id, {feature: value}) row, pipelined; return the count."""
    n = 0
    pipe = client.pipeline(transaction=False)
    for entity_type, entity_id, values in rows:
        key = entity_key(entity_type, entity_id, prefix)
        pipe.delete(key)
        pipe.hset(key, mapping=values)
        n += 1
        if n % BATCH == 0:
            pipe.execute()
    pipe.execute()
    return n


def load_demo_features(client: redis.Redis, seed: int = 7, prefix: str = "features") -> int:
    """Write the demo users and merchants (the same entities the models were trained on)."""
    return load_rows(client, entity_feature_rows(generate_entities(seed)), prefix)
