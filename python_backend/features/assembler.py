"""Feature assembly: request ids + context -> the model's input vectors.

For every row the assembler looks up the row's user and merchant hashes (hot-entity cache
first, then one pipelined Redis round trip for all misses of the batch), parses and validates
every value against the feature spec, replaces anything missing or invalid by the feature's
default and lays the values out in spec order. A request with bad inputs gets an
:class:`AssemblyError` without failing the other requests of the batch; a store outage yields
complete vectors of defaults flagged ``feature_store_ok=False``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from python_backend.breaker import CircuitBreaker
from python_backend.feature_spec import ONLINE_GROUPS, FeatureGroup, FeatureSpec
from python_backend.features.cache import CachedRow, EntityCache
from python_backend.features.keys import DEFAULT_KEY_PREFIX, entity_key
from python_backend.features.store import FeatureStoreUnavailable, RawValues, RedisFeatureStore

logger = logging.getLogger(__name__)

MAX_ID_BYTES = 128
_FLOAT32_MAX = float(np.finfo(np.float32).max)
CONTEXT_GROUP: FeatureGroup = "context"


@dataclass(frozen=True, slots=True)
class AssemblyInput:
    """The rows of one Triton request: one user id, merchant id and context row per row."""

    user_ids: Sequence[bytes]
    merchant_ids: Sequence[bytes]
    #: float32 [rows, n_context]
    context: np.ndarray


@dataclass(frozen=True, slots=True)
class AssemblyOutput:
    #: float32 [rows, n_features] in spec order
    features: np.ndarray
    #: int32 [rows]: features of the row replaced by their default
    imputed_count: np.ndarray
    #: bool [rows]: False when the row's entities could not be read (store down, breaker open)
    feature_store_ok: np.ndarray


@dataclass(frozen=True, slots=True)
class AssemblyError:
    """Why one request was rejected."""

    message: str


@dataclass
class AssemblerStats:
    """Cumulative counters since the assembler was built."""

    requests: int = 0
    invalid_requests: int = 0
    rows: int = 0
    #: features replaced by their default, per group (user, merchant, context)
    imputed: dict[str, int] = field(default_factory=dict)
    #: row lookups whose entity has no hash in the store
    entities_not_found: int = 0
    store_round_trips: int = 0
    store_errors: int = 0
    #: assemble() calls that skipped the store because the breaker was open
    breaker_short_circuits: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    #: duration of the most recent store round trip
    last_fetch_seconds: float = 0.0


class _InvalidRequest(Exception):
    pass


@dataclass(frozen=True)
class _Layout:
    """Where a group's features go in the vector and what values they accept."""

    positions: np.ndarray
    default: np.ndarray
    low: np.ndarray
    high: np.ndarray
    width: int

    @classmethod
    def of(cls, spec: FeatureSpec, group: FeatureGroup) -> _Layout:
        defs = spec.group_features(group)
        return cls(
            positions=np.asarray(spec.indices(group), dtype=np.intp),
            default=np.array([f.default for f in defs], dtype=np.float32),
            low=np.array([f.min for f in defs], dtype=np.float32),
            high=np.array([f.max for f in defs], dtype=np.float32),
            width=len(defs),
        )

    def clean(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Replace non-finite or out-of-range values by defaults; count them per row."""
        valid = np.isfinite(values) & (values >= self.low) & (values <= self.high)
        return np.where(valid, values, self.default), self.width - valid.sum(axis=1)


@dataclass
class _Request:
    """A validated request: decoded ids per online group and its context rows."""

    ids: dict[str, list[str]]
    context: np.ndarray
    rows: int


def online_fields(spec: FeatureSpec) -> dict[str, list[str]]:
    """Hash fields to read per online group: the group's feature names in spec order."""
    return {
        group: [f.name for f in spec.group_features(group)]
        for group in ONLINE_GROUPS
        if spec.indices(group)
    }


def parse_row(raw: RawValues) -> CachedRow:
    """Raw hash values -> float32 row (NaN where missing/unparsable); ``None`` if all missing."""
    if all(value is None for value in raw):
        return None
    return np.array([_to_float(value) for value in raw], dtype=np.float32)


def _to_float(value: bytes | None) -> float:
    """The value as a float32-representable number, NaN if it is not one."""
    if value is None:
        return math.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if -_FLOAT32_MAX <= number <= _FLOAT32_MAX else math.nan


class FeatureAssembler:
    """Builds model input vectors for a batch of requests."""

    def __init__(
        self,
        spec: FeatureSpec,
        store: RedisFeatureStore,
        cache: EntityCache,
        breaker: CircuitBreaker,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._spec = spec
        self._store = store
        self._cache = cache
        self._breaker = breaker
        self._prefix = key_prefix
        self._clock = clock
        self._groups = {group: _Layout.of(spec, group) for group in online_fields(spec)}
        self._context = _Layout.of(spec, CONTEXT_GROUP)
        #: request input carrying each online group's entity id, for error messages
        self._id_inputs = {
            group: spec.entity_keys.get(group, f"{group}_id") for group in ONLINE_GROUPS
        }
        expected = online_fields(spec)
        actual = {group: store.fields_by_group.get(group) for group in expected}
        if actual != expected:
            raise ValueError(
                f"store fields {actual} do not match the spec's online features {expected}"
            )
        self._stats = AssemblerStats(imputed={g: 0 for g in (*self._groups, CONTEXT_GROUP)})

    def stats(self) -> AssemblerStats:
        """A snapshot of the counters."""
        return dataclasses.replace(self._stats, imputed=dict(self._stats.imputed))

    def assemble(self, inputs: Sequence[AssemblyInput]) -> list[AssemblyOutput | AssemblyError]:
        """One result per input, in order. Costs at most one store round trip."""
        self._stats.requests += len(inputs)
        results: dict[int, AssemblyOutput | AssemblyError] = {}
        valid: list[tuple[int, _Request]] = []
        for i, item in enumerate(inputs):
            try:
                valid.append((i, self._validate(item)))
            except _InvalidRequest as exc:
                self._stats.invalid_requests += 1
                results[i] = AssemblyError(str(exc))
        if valid:
            features, imputed, ok = self._assemble_rows([request for _, request in valid])
            start = 0
            for i, request in valid:
                end = start + request.rows
                results[i] = AssemblyOutput(features[start:end], imputed[start:end], ok[start:end])
                start = end
        return [results[i] for i in range(len(inputs))]

    def _validate(self, item: AssemblyInput) -> _Request:
        users, merchants = item.user_ids, item.merchant_ids
        try:
            context = np.asarray(item.context, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise _InvalidRequest(f"context is not numeric: {exc}") from None
        n_rows = len(context) if context.ndim >= 1 else -1
        if not len(users) == len(merchants) == n_rows:
            raise _InvalidRequest(
                f"row counts differ: {self._id_inputs['user']} has {len(users)}, "
                f"{self._id_inputs['merchant']} has {len(merchants)}, "
                f"context has {max(n_rows, 0)}"
            )
        if n_rows == 0:
            raise _InvalidRequest("request has no rows")
        if context.ndim != 2 or context.shape[1] != self._context.width:
            raise _InvalidRequest(
                f"context must have shape [rows, {self._context.width}], got {list(context.shape)}"
            )
        ids = {
            "user": _decode_ids(self._id_inputs["user"], users),
            "merchant": _decode_ids(self._id_inputs["merchant"], merchants),
        }
        return _Request(ids=ids, context=context, rows=n_rows)

    def _assemble_rows(self, requests: list[_Request]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stats = self._stats
        n_rows = sum(r.rows for r in requests)
        stats.rows += n_rows
        features = np.empty((n_rows, self._spec.n_features), dtype=np.float32)
        imputed = np.zeros(n_rows, dtype=np.int32)
        ok = np.ones(n_rows, dtype=bool)

        prefix = self._prefix
        keys = {
            group: [
                entity_key(group, entity_id, prefix) for r in requests for entity_id in r.ids[group]
            ]
            for group in self._groups
        }
        rows_by_key = self._lookup(keys)

        for group, layout in self._groups.items():
            row_keys = keys[group]
            unique = list(dict.fromkeys(row_keys))
            position = {key: j for j, key in enumerate(unique)}
            values = np.full((len(unique), layout.width), np.nan, dtype=np.float32)
            not_found = np.zeros(len(unique), dtype=bool)
            unavailable = np.zeros(len(unique), dtype=bool)
            for j, key in enumerate(unique):
                if key not in rows_by_key:
                    unavailable[j] = True
                    continue
                row = rows_by_key[key]
                if row is None:
                    not_found[j] = True
                else:
                    values[j] = row
            clean, counts = layout.clean(values)
            index = np.fromiter((position[key] for key in row_keys), dtype=np.intp, count=n_rows)
            features[:, layout.positions] = clean[index]
            group_imputed = counts[index]
            imputed += group_imputed.astype(np.int32)
            ok &= ~unavailable[index]
            stats.imputed[group] += int(group_imputed.sum())
            stats.entities_not_found += int(not_found[index].sum())

        clean, counts = self._context.clean(np.concatenate([r.context for r in requests]))
        features[:, self._context.positions] = clean
        imputed += counts.astype(np.int32)
        stats.imputed[CONTEXT_GROUP] += int(counts.sum())
        return features, imputed, ok

    def _lookup(self, keys: dict[str, list[str]]) -> dict[str, CachedRow]:
        """Rows of every distinct key: cache, then one store fetch for the misses.

        Keys whose rows could not be read (store failed, breaker open) are absent.
        """
        wanted = {key: group for group, group_keys in keys.items() for key in group_keys}
        rows = self._cache.lookup(wanted)
        self._stats.cache_hits += len(rows)
        misses = [(group, key) for key, group in wanted.items() if key not in rows]
        self._stats.cache_misses += len(misses)
        if misses:
            rows.update(self._fetch(misses))
        return rows

    def _fetch(self, misses: list[tuple[str, str]]) -> dict[str, CachedRow]:
        stats = self._stats
        if not self._breaker.allow():
            stats.breaker_short_circuits += 1
            return {}
        stats.store_round_trips += 1
        start = self._clock()
        try:
            raw = self._store.fetch(misses)
        except FeatureStoreUnavailable as exc:
            stats.store_errors += 1
            self._breaker.record_failure()
            logger.warning(
                "feature store unavailable, serving defaults for %d entities: %s", len(misses), exc
            )
            return {}
        finally:
            stats.last_fetch_seconds = self._clock() - start
        self._breaker.record_success()
        fetched: dict[str, CachedRow] = {}
        for key, values in raw.items():
            row = parse_row(values)
            self._cache.put(key, row)
            fetched[key] = row
        return fetched


def _decode_ids(name: str, raw_ids: Sequence[bytes]) -> list[str]:
    decoded: list[str] = []
    for i, raw in enumerate(raw_ids):
        if not isinstance(raw, bytes):
            raise _InvalidRequest(f"{name}[{i}] must be bytes, got {type(raw).__name__}")
        value = raw.strip()
        if not value:
            raise _InvalidRequest(f"{name}[{i}] is empty")
        if len(value) > MAX_ID_BYTES:
            raise _InvalidRequest(
                f"{name}[{i}] is {len(value)} bytes long, at most {MAX_ID_BYTES} allowed"
            )
        try:
            decoded.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            raise _InvalidRequest(f"{name}[{i}] is not valid UTF-8") from None
    return decoded
