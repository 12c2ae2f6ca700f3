"""Structured logging: one JSON object per line, request context from context variables.

Everything the gateway logs goes through the ``gateway`` logger tree; ``configure_logging``
writes the lines to stderr. ``request_id``, ``model`` and ``model_version`` come from context
variables set by the prediction service; extra fields are passed as ``extra={"fields": {...}}``.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from typing import Any

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
model_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("model", default=None)
model_version_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "model_version", default=None
)

_CONTEXT = (
    ("request_id", request_id_var),
    ("model", model_var),
    ("model_version", model_version_var),
)


class ContextFilter(logging.Filter):
    """Copy the request context onto the record where it is emitted (the caller's task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT:
            if not hasattr(record, name):
                setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, _ in _CONTEXT:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update({k: v for k, v in fields.items() if v is not None})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        options = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
        return orjson.dumps(line, default=str, option=options).decode()


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for the gateway, uvicorn and libraries (idempotent)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root.handlers[:] = [handler]
