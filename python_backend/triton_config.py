"""Reading a python-backend model's ``args`` and config parameters.

Triton hands ``initialize`` the model config as JSON in ``args["model_config"]``; custom
parameters appear as ``{"parameters": {"key": {"string_value": "..."}}}``. An absent or empty
parameter means "use the default".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def model_config(args: Mapping[str, str]) -> dict[str, Any]:
    """The parsed model config of ``initialize(args)``."""
    return json.loads(args["model_config"])


def version_dir(args: Mapping[str, str]) -> str:
    """Directory of the model version being loaded, where its files live."""
    return os.path.join(args["model_repository"], args["model_version"])


def get_param(config: Mapping[str, Any], key: str, default: str | None = None) -> str | None:
    """String value of parameter ``key``, or ``default`` if it is absent or empty."""
    entry = (config.get("parameters") or {}).get(key)
    if not isinstance(entry, Mapping):
        return default
    value = entry.get("string_value")
    return default if value is None or value == "" else str(value)


def param_int(config: Mapping[str, Any], key: str, default: int) -> int:
    return _convert(config, key, default, int, "an integer")


def param_float(config: Mapping[str, Any], key: str, default: float) -> float:
    return _convert(config, key, default, float, "a number")


def param_list(
    config: Mapping[str, Any],
    key: str,
    parse: Callable[[str], T],
    default: list[T] | None = None,
) -> list[T]:
    """Comma-separated parameter parsed item by item, e.g. ``"0.5,0.5"`` with ``float``."""
    raw = get_param(config, key)
    if raw is None:
        return list(default or [])
    items = [item.strip() for item in raw.split(",")]
    try:
        return [parse(item) for item in items if item]
    except ValueError as exc:
        raise ValueError(f"model parameter {key}={raw!r} is invalid: {exc}") from None


def _convert(
    config: Mapping[str, Any], key: str, default: T, parse: Callable[[str], T], what: str
) -> T:
    raw = get_param(config, key)
    if raw is None:
        return default
    try:
        return parse(raw.strip())
    except ValueError:
        raise ValueError(f"model parameter {key}={raw!r} is not {what}") from None
