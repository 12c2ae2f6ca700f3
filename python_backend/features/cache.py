"""Hot-entity cache in front of the online store.

Holds the parsed feature row of recently seen entities for a few seconds so that a burst of
requests for the same user or merchant costs one Redis lookup. Entities the store does not know
are cached too (as ``None``), with the same TTL, so that unknown ids do not hammer Redis.
Results of failed fetches are never put here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np
from cachetools import TTLCache

#: A cached row: the group's features as float32 (NaN where a field was missing or
#: unparsable), or ``None`` when the entity does not exist in the store.
CachedRow = np.ndarray | None


class EntityCache:
    """LRU cache with a per-entry TTL, keyed by the entity's Redis key.

    ``max_entities=0`` or ``ttl_s=0`` disables caching: every lookup misses.
    """

    def __init__(
        self,
        max_entities: int = 10_000,
        ttl_s: float = 5.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entities < 0:
            raise ValueError("max_entities must be >= 0")
        if ttl_s < 0:
            raise ValueError("ttl_s must be >= 0")
        self.enabled = max_entities > 0 and ttl_s > 0
        self._entries: TTLCache[str, CachedRow] = TTLCache(
            maxsize=max(max_entities, 1), ttl=ttl_s or 1.0, timer=timer
        )
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, keys: Iterable[str]) -> dict[str, CachedRow]:
        """The cached rows of ``keys``; keys that are not cached (or expired) are absent."""
        found: dict[str, CachedRow] = {}
        if not self.enabled:
            self.misses += sum(1 for _ in keys)
            return found
        entries = self._entries
        misses = 0
        with entries.timer:  # one clock read for the whole lookup
            for key in keys:
                try:
                    found[key] = entries[key]
                except KeyError:
                    misses += 1
        self.hits += len(found)
        self.misses += misses
        return found

    def put(self, key: str, row: CachedRow) -> None:
        """Cache the parsed row of ``key`` (``None``: the entity does not exist)."""
        if not self.enabled:
            return
        if row is not None:
            row.flags.writeable = False
        self._entries[key] = row
