"""Synthetic card-transaction fraud data.

Users and merchants are entity tables with a hidden risk score each; their 20 + 20 features are
noisy views of that risk (the online store serves them per entity id). Each transaction joins one
user row, one merchant row and 10 request-time context features; the label is a nonlinear,
noisy function of the hidden risks and the context, so models can learn it well but not
perfectly. Everything is drawn from ``numpy.random.default_rng`` with fixed seeds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from python_backend import contract
from python_backend.feature_spec import (
    ONLINE_GROUPS,
    FeatureDef,
    FeatureGroup,
    FeatureSpec,
    FeatureStats,
    TrainingStats,
)

QUANTILES: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
HISTOGRAM_BINS = 20
DEFAULT_ENTITY_KEYS: dict[FeatureGroup, str] = {"user": "user_id", "merchant": "merchant_id"}


class FeatureBounds(NamedTuple):
    """A feature's name, group and the physical range its generator clips to."""

    name: str
    group: FeatureGroup
    min: float
    max: float


def _group(group: FeatureGroup, rows: Sequence[tuple[str, float, float]]) -> tuple:
    return tuple(FeatureBounds(name, group, lo, hi) for name, lo, hi in rows)


USER_FEATURES: tuple[FeatureBounds, ...] = _group(
    "user",
    [
        ("user_account_age_days", 0, 3650),
        ("user_email_age_days", 0, 7300),
        ("user_txn_count_1d", 0, 500),
        ("user_txn_count_7d", 0, 2000),
        ("user_txn_count_30d", 0, 5000),
        ("user_avg_amount_30d", 0, 5000),
        ("user_std_amount_30d", 0, 10000),
        ("user_max_amount_30d", 0, 25000),
        ("user_distinct_merchants_30d", 0, 5000),
        ("user_distinct_countries_90d", 0, 50),
        ("user_chargeback_count_180d", 0, 100),
        ("user_chargeback_rate_90d", 0, 1),
        ("user_declined_rate_30d", 0, 1),
        ("user_failed_logins_7d", 0, 100),
        ("user_password_resets_90d", 0, 50),
        ("user_devices_count_30d", 0, 50),
        ("user_credit_limit", 0, 100000),
        ("user_utilization_ratio", 0, 1),
        ("user_night_txn_ratio_30d", 0, 1),
        ("user_international_ratio_90d", 0, 1),
    ],
)

MERCHANT_FEATURES: tuple[FeatureBounds, ...] = _group(
    "merchant",
    [
        ("merchant_age_days", 0, 7300),
        ("merchant_txn_count_1d", 0, 1e6),
        ("merchant_txn_count_7d", 0, 1e7),
        ("merchant_txn_count_30d", 0, 3e7),
        ("merchant_distinct_users_30d", 0, 3e7),
        ("merchant_avg_ticket", 0, 10000),
        ("merchant_std_ticket", 0, 20000),
        ("merchant_fraud_rate_30d", 0, 1),
        ("merchant_chargeback_rate_90d", 0, 1),
        ("merchant_refund_rate_30d", 0, 1),
        ("merchant_declined_rate_30d", 0, 1),
        ("merchant_category_risk", 0, 1),
        ("merchant_high_risk_mcc", 0, 1),
        ("merchant_country_risk", 0, 1),
        ("merchant_new_user_ratio_30d", 0, 1),
        ("merchant_international_ratio_30d", 0, 1),
        ("merchant_card_present_ratio_30d", 0, 1),
        ("merchant_night_txn_ratio_30d", 0, 1),
        ("merchant_avg_user_age_days", 0, 3650),
        ("merchant_velocity_zscore", -10, 10),
    ],
)

#: range of each context feature; the order (and the set) is the contract's
_CONTEXT_BOUNDS: dict[str, tuple[float, float]] = {
    "amount": (0, 25000),
    "hour_of_day": (0, 23),
    "day_of_week": (0, 6),
    "channel": (0, 2),  # 0 web, 1 app, 2 pos
    "is_international": (0, 1),
    "card_present": (0, 1),
    "device_age_days": (0, 3650),
    "ip_risk_score": (0, 1),
    "distance_from_home_km": (0, 20000),
    "is_new_device": (0, 1),
}
CONTEXT_FEATURES: tuple[FeatureBounds, ...] = _group(
    "context", [(name, *_CONTEXT_BOUNDS[name]) for name in contract.CONTEXT_FEATURES]
)

#: All 50 features in model-input order: user, merchant, context.
FEATURES: tuple[FeatureBounds, ...] = USER_FEATURES + MERCHANT_FEATURES + CONTEXT_FEATURES
FEATURE_INDEX: dict[str, int] = {f.name: i for i, f in enumerate(FEATURES)}


def feature_names(group: FeatureGroup | None = None) -> list[str]:
    """Feature names in model-input order, optionally of one group only."""
    return [f.name for f in FEATURES if group is None or f.group == group]


@dataclass(frozen=True)
class Entities:
    """User and merchant tables; row ``i`` of a feature matrix belongs to id ``i``."""

    user_ids: list[str]
    merchant_ids: list[str]
    user_features: np.ndarray  # float32 [n_users, 20], columns as USER_FEATURES
    merchant_features: np.ndarray  # float32 [n_merchants, 20], columns as MERCHANT_FEATURES
    user_risk: np.ndarray  # float64 [n_users], hidden; drives features and labels
    merchant_risk: np.ndarray  # float64 [n_merchants], hidden


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def _to_table(columns: dict[str, np.ndarray], bounds: Sequence[FeatureBounds]) -> np.ndarray:
    """Stack generated columns in ``bounds`` order, clipped to each feature's range."""
    if list(columns) != [b.name for b in bounds]:
        raise ValueError("generated columns do not match the feature table")
    table = np.column_stack([np.clip(columns[b.name], b.min, b.max) for b in bounds])
    return table.astype(np.float32)


def _user_columns(rng: np.random.Generator, risk: np.ndarray) -> dict[str, np.ndarray]:
    n = risk.shape[0]
    up = _relu(risk)
    account_age = np.rint(np.exp(rng.normal(6.3 - 0.35 * risk, 0.9)))
    activity = rng.lognormal(0.0, 0.6, n)
    count_30d = rng.poisson(20.0 * activity * (1.0 + 0.15 * up))
    count_7d = rng.binomial(count_30d, 7 / 30) + rng.poisson(0.5 * up)
    avg_amount = rng.lognormal(np.log(60.0) + 0.1 * risk, 0.7)
    std_amount = avg_amount * rng.uniform(0.2, 1.2, n)
    return {
        "user_account_age_days": account_age,
        "user_email_age_days": account_age + np.rint(rng.exponential(400.0, n)),
        "user_txn_count_1d": rng.binomial(count_7d, 1 / 7) + rng.poisson(0.2 * up),
        "user_txn_count_7d": count_7d,
        "user_txn_count_30d": count_30d,
        "user_avg_amount_30d": np.round(avg_amount, 2),
        "user_std_amount_30d": np.round(std_amount, 2),
        "user_max_amount_30d": np.round(avg_amount + std_amount * rng.uniform(1.0, 4.0, n), 2),
        "user_distinct_merchants_30d": np.minimum(count_30d, rng.poisson(3.0 + 0.4 * count_30d)),
        "user_distinct_countries_90d": 1 + rng.poisson(0.2 + 0.6 * _sigmoid(risk - 1.0)),
        "user_chargeback_count_180d": rng.poisson(0.05 * np.exp(0.9 * risk)),
        "user_chargeback_rate_90d": _sigmoid(rng.normal(-4.5 + 0.9 * risk, 0.4)),
        "user_declined_rate_30d": _sigmoid(rng.normal(-3.2 + 0.6 * risk, 0.4)),
        "user_failed_logins_7d": rng.poisson(0.3 * np.exp(0.6 * risk)),
        "user_password_resets_90d": rng.poisson(0.1 * np.exp(0.5 * risk)),
        "user_devices_count_30d": 1 + rng.poisson(0.4 * np.exp(0.4 * risk)),
        "user_credit_limit": 100.0 * np.rint(rng.lognormal(np.log(50.0) - 0.1 * risk, 0.6)),
        "user_utilization_ratio": _sigmoid(rng.normal(-0.5 + 0.4 * risk, 1.0)),
        "user_night_txn_ratio_30d": rng.beta(1.0 + 0.6 * up, 8.0),
        "user_international_ratio_90d": rng.beta(0.5 + 0.8 * _sigmoid(risk), 10.0),
    }


def _merchant_columns(rng: np.random.Generator, risk: np.ndarray) -> dict[str, np.ndarray]:
    n = risk.shape[0]
    up = _relu(risk)
    daily_volume = rng.lognormal(np.log(200.0), 1.2, n)
    count_30d = rng.poisson(30.0 * daily_volume)
    avg_ticket = rng.lognormal(np.log(50.0) + 0.15 * risk, 0.8)
    category_risk = np.round(_sigmoid(rng.normal(0.8 * risk - 1.0, 0.8)), 2)
    in_store = rng.random(n) < 0.5
    return {
        "merchant_age_days": np.rint(np.exp(rng.normal(7.0 - 0.3 * risk, 1.0))),
        "merchant_txn_count_1d": rng.poisson(daily_volume),
        "merchant_txn_count_7d": rng.poisson(7.0 * daily_volume),
        "merchant_txn_count_30d": count_30d,
        "merchant_distinct_users_30d": rng.binomial(count_30d, 0.7),
        "merchant_avg_ticket": np.round(avg_ticket, 2),
        "merchant_std_ticket": np.round(avg_ticket * rng.uniform(0.3, 1.5, n), 2),
        "merchant_fraud_rate_30d": _sigmoid(rng.normal(-4.0 + 0.8 * risk, 0.3)),
        "merchant_chargeback_rate_90d": _sigmoid(rng.normal(-5.0 + 0.7 * risk, 0.6)),
        "merchant_refund_rate_30d": _sigmoid(rng.normal(-3.5 + 0.3 * risk, 0.6)),
        "merchant_declined_rate_30d": _sigmoid(rng.normal(-3.5 + 0.5 * risk, 0.6)),
        "merchant_category_risk": category_risk,
        "merchant_high_risk_mcc": (category_risk > 0.5).astype(np.float64),
        "merchant_country_risk": _sigmoid(rng.normal(-1.5 + 0.5 * risk, 1.0)),
        "merchant_new_user_ratio_30d": rng.beta(2.0 + up, 12.0),
        "merchant_international_ratio_30d": rng.beta(1.0 + 0.5 * _sigmoid(risk), 15.0),
        "merchant_card_present_ratio_30d": np.where(
            in_store, rng.beta(12.0, 3.0, n), rng.beta(1.0, 15.0, n)
        ),
        "merchant_night_txn_ratio_30d": rng.beta(1.5 + 0.7 * up, 10.0),
        "merchant_avg_user_age_days": rng.lognormal(np.log(700.0) - 0.2 * risk, 0.4),
        "merchant_velocity_zscore": rng.normal(0.3 * risk, 1.0),
    }


def generate_entities(seed: int = 7, n_users: int = 20_000, n_merchants: int = 2_000) -> Entities:
    """Deterministic user and merchant tables for ``seed``."""
    rng = np.random.default_rng([seed, 0])
    user_risk = rng.normal(0.0, 1.0, n_users)
    merchant_risk = rng.normal(0.0, 1.0, n_merchants)
    return Entities(
        user_ids=[f"u_{i:06d}" for i in range(1, n_users + 1)],
        merchant_ids=[f"m_{i:05d}" for i in range(1, n_merchants + 1)],
        user_features=_to_table(_user_columns(rng, user_risk), USER_FEATURES),
        merchant_features=_to_table(_merchant_columns(rng, merchant_risk), MERCHANT_FEATURES),
        user_risk=user_risk,
        merchant_risk=merchant_risk,
    )


def _user_col(entities: Entities, name: str, idx: np.ndarray) -> np.ndarray:
    return entities.user_features[idx, FEATURE_INDEX[name]].astype(np.float64)


def _merchant_col(entities: Entities, name: str, idx: np.ndarray) -> np.ndarray:
    col = FEATURE_INDEX[name] - len(USER_FEATURES)
    return entities.merchant_features[idx, col].astype(np.float64)


def _context_columns(
    rng: np.random.Generator, entities: Entities, u: np.ndarray, m: np.ndarray
) -> dict[str, np.ndarray]:
    n = u.shape[0]
    user_risk = entities.user_risk[u]
    card_present_ratio = _merchant_col(entities, "merchant_card_present_ratio_30d", m)
    channel = np.where(rng.random(n) < card_present_ratio, 2, rng.integers(0, 2, n))
    card_present = (channel == 2).astype(np.float64)
    night = rng.random(n) < _user_col(entities, "user_night_txn_ratio_30d", u)
    hour = np.where(night, rng.integers(0, 6, n), np.rint(rng.normal(14.0, 3.5, n)) % 24)
    international = rng.random(n) < (
        _user_col(entities, "user_international_ratio_90d", u)
        + 0.5 * _merchant_col(entities, "merchant_international_ratio_30d", m)
    )
    typical = 0.5 * _user_col(entities, "user_avg_amount_30d", u) + 0.5 * _merchant_col(
        entities, "merchant_avg_ticket", m
    )
    new_device = rng.random(n) < 0.04 + 0.12 * _sigmoid(2.0 * user_risk - 2.0)
    distance = np.where(
        card_present == 1.0, rng.lognormal(np.log(5.0), 1.2, n), rng.lognormal(np.log(30), 1.5, n)
    ) + international * rng.uniform(300.0, 9000.0, n)
    return {
        "amount": np.round(rng.lognormal(np.log(np.maximum(typical, 1.0)), 0.8), 2),
        "hour_of_day": hour,
        "day_of_week": rng.integers(0, 7, n),
        "channel": channel,
        "is_international": international.astype(np.float64),
        "card_present": card_present,
        "device_age_days": np.where(new_device, 0.0, np.rint(rng.lognormal(5.0, 1.0, n))),
        "ip_risk_score": rng.beta(1.0 + 0.8 * _relu(user_risk), 7.0),
        "distance_from_home_km": np.round(distance, 1),
        "is_new_device": new_device.astype(np.float64),
    }


def _fraud_logit(
    entities: Entities, u: np.ndarray, m: np.ndarray, ctx: dict[str, np.ndarray]
) -> np.ndarray:
    ru, rm = entities.user_risk[u], entities.merchant_risk[m]
    unusual_amount = ctx["amount"] > 3.0 * _user_col(entities, "user_avg_amount_30d", u)
    return (
        -5.2
        + 1.5 * ru
        + 1.1 * rm
        + 0.4 * ru * rm
        + 1.3 * unusual_amount
        + 1.6 * ctx["is_new_device"] * (ctx["ip_risk_score"] > 0.3)
        + 1.0 * ctx["is_international"] * (1.0 - ctx["card_present"])
        + 0.8 * (ctx["hour_of_day"] < 6)
        - 1.2 * ctx["card_present"]
        + 0.9 * (_user_col(entities, "user_failed_logins_7d", u) >= 3)
        + 0.6 * _merchant_col(entities, "merchant_high_risk_mcc", m) * unusual_amount
    )


def generate_transactions(
    entities: Entities, seed: int = 7, n_rows: int = 60_000
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labelled transactions: ``(X float32 [n, 50], y int64 [n], user_idx, merchant_idx)``.

    Users are drawn uniformly, merchants in proportion to their 30-day volume.
    """
    rng = np.random.default_rng([seed, 1])
    n_users, n_merchants = len(entities.user_ids), len(entities.merchant_ids)
    volume = _merchant_col(entities, "merchant_txn_count_30d", np.arange(n_merchants)) + 1.0
    user_idx = rng.integers(0, n_users, n_rows)
    merchant_idx = rng.choice(n_merchants, size=n_rows, p=volume / volume.sum())
    context = _to_table(_context_columns(rng, entities, user_idx, merchant_idx), CONTEXT_FEATURES)
    ctx = {b.name: context[:, i].astype(np.float64) for i, b in enumerate(CONTEXT_FEATURES)}
    logit = _fraud_logit(entities, user_idx, merchant_idx, ctx) + rng.normal(0.0, 0.5, n_rows)
    y = (rng.random(n_rows) < _sigmoid(logit)).astype(np.int64)
    X = np.hstack(
        [entities.user_features[user_idx], entities.merchant_features[merchant_idx], context]
    )
    return X, y, user_idx, merchant_idx


def build_feature_spec(X: np.ndarray, names: Sequence[str] | None = None) -> FeatureSpec:
    """Spec for the columns of ``X`` (all 50 features unless ``names`` says which).

    Defaults are the per-feature medians of ``X``; the valid range is the generator's bounds.
    """
    names = feature_names() if names is None else list(names)
    if X.ndim != 2 or X.shape[1] != len(names):
        raise ValueError(f"X has shape {X.shape}, expected [n, {len(names)}]")
    bounds = [FEATURES[FEATURE_INDEX[name]] for name in names]
    defs = []
    for j, b in enumerate(bounds):
        col = X[:, j]
        if col.min() < b.min or col.max() > b.max:
            raise ValueError(f"values of {b.name} fall outside [{b.min}, {b.max}]")
        median = float(np.float32(np.median(col)))
        defs.append(FeatureDef(name=b.name, group=b.group, default=median, min=b.min, max=b.max))
    groups = {b.group for b in bounds}
    keys = {g: key for g, key in DEFAULT_ENTITY_KEYS.items() if g in groups and g in ONLINE_GROUPS}
    return FeatureSpec(features=defs, entity_keys=keys)


def _feature_stats(col: np.ndarray) -> FeatureStats:
    col = col.astype(np.float64)
    counts, edges = np.histogram(col, bins=HISTOGRAM_BINS)
    return FeatureStats(
        mean=float(col.mean()),
        std=float(col.std()),
        min=float(col.min()),
        max=float(col.max()),
        quantiles={
            str(q): float(v) for q, v in zip(QUANTILES, np.quantile(col, QUANTILES), strict=True)
        },
        histogram_edges=[float(e) for e in edges],
        histogram_counts=[int(c) for c in counts],
    )


def compute_training_stats(X: np.ndarray, y: np.ndarray, spec: FeatureSpec) -> TrainingStats:
    """Quantiles, histograms and class prior of a training set laid out as ``spec``."""
    if X.ndim != 2 or X.shape[1] != spec.n_features or X.shape[0] != y.shape[0]:
        raise ValueError(f"X {X.shape} / y {y.shape} do not match a {spec.n_features}-feature spec")
    return TrainingStats(
        n_rows=int(X.shape[0]),
        class_prior=float(np.mean(y)),
        features={f.name: _feature_stats(X[:, j]) for j, f in enumerate(spec.features)},
    )


def format_value(value: float) -> str:
    """Shortest-enough text of a float32 that parses back to the same float32."""
    return format(float(value), ".9g")


def entity_feature_rows(entities: Entities) -> Iterator[tuple[str, str, dict[str, str]]]:
    """``(entity_type, entity_id, {feature: value})`` for every user, then every merchant."""
    tables = (
        ("user", entities.user_ids, entities.user_features, USER_FEATURES),
        ("merchant", entities.merchant_ids, entities.merchant_features, MERCHANT_FEATURES),
    )
    for entity_type, ids, table, bounds in tables:
        names = [b.name for b in bounds]
        for entity_id, row in zip(ids, table.tolist(), strict=True):
            yield entity_type, entity_id, dict(zip(names, map(format_value, row), strict=True))
