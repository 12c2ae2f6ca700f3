"""Self-verifying tokens of async predictions: ``v1.<job id>.<issued at>.<mac>``.

* ``job id``: 32 hex characters (128 random bits); the Kafka message key, the Redis key of
  the result and the ``X-RTInfer-Delivery`` id of its callbacks;
* ``issued at``: Unix seconds when the gateway accepted the job;
* ``mac``: the first 32 hex characters (128 bits) of HMAC-SHA256 with the token secret over
  ``v1|<model name>|<job id>|<issued at>``.

The gateway can tell a token it issued from anything else without storing anything at
submit time: a token with a valid MAC for this model, younger than the result TTL, whose
result is not stored yet reads ``pending``; a forged, garbled or foreign-model token reads
``unknown``, as does a valid token older than the TTL with no stored result.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

VERSION = "v1"
MAC_HEX_CHARS = 32
#: accepted clock skew between the gateways that issue and the ones that check tokens
MAX_CLOCK_SKEW_S = 60
_TOKEN = re.compile(
    rf"{VERSION}\.(?P<job>[0-9a-f]{{32}})\.(?P<t>[0-9]{{1,12}})\.(?P<mac>[0-9a-f]{{{MAC_HEX_CHARS}}})"
)


@dataclass(frozen=True)
class AsyncToken:
    job_id: str
    issued_at: int
    text: str


def _mac(key: bytes, model_name: str, job_id: str, issued_at: int) -> str:
    message = f"{VERSION}|{model_name}|{job_id}|{issued_at}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:MAC_HEX_CHARS]


def issue_token(key: bytes, model_name: str, now: float | None = None) -> AsyncToken:
    """A new job id and its token for ``model_name``."""
    job_id = secrets.token_hex(16)
    issued_at = int(time.time() if now is None else now)
    mac = _mac(key, model_name, job_id, issued_at)
    return AsyncToken(job_id, issued_at, f"{VERSION}.{job_id}.{issued_at}.{mac}")


def read_token(
    key: bytes, model_name: str, text: str, now: float | None = None
) -> AsyncToken | None:
    """The token if this gateway issued it for ``model_name`` (and not in the future), else None.

    Age is not checked here: a stored result is served for as long as it is stored.
    """
    match = _TOKEN.fullmatch(text)
    if match is None:
        return None
    job_id, issued_at = match["job"], int(match["t"])
    if not hmac.compare_digest(_mac(key, model_name, job_id, issued_at), match["mac"]):
        return None
    if issued_at > (time.time() if now is None else now) + MAX_CLOCK_SKEW_S:
        return None
    return AsyncToken(job_id, issued_at, text)


def may_be_pending(token: AsyncToken, ttl_s: float, now: float | None = None) -> bool:
    """A job this young may still be queued or running (after that: ``unknown``)."""
    return (time.time() if now is None else now) - token.issued_at <= ttl_s
