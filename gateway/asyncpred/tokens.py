"""Self-verifying tokens of async predictions: ``v2.<job id>.<issued at>.<owner>.<mac>``.

* ``job id``: 32 hex characters (128 random bits); the Kafka message key, the Redis key of
  the result and the ``X-RTInfer-Delivery`` id of its callbacks;
* ``issued at``: Unix seconds when the gateway accepted the job;
* ``owner``: the id of the API key that submitted the job (``-`` when the gateway runs
  without authentication); key ids are not secret, they are logged;
* ``mac``: the first 32 hex characters (128 bits) of HMAC-SHA256 with the token secret over
  ``v2|<model name>|<job id>|<issued at>|<owner>``.

The gateway can tell a token it issued from anything else without storing anything at
submit time: a token with a valid MAC for this model, younger than the result TTL, whose
result is not stored yet reads ``pending``. Only its owner (or an admin key) may read it: for
any other key it does not exist, exactly like a forged, garbled or foreign-model token, or a
valid token older than the TTL with no stored result.

``v1`` tokens (no owner) issued before owners were bound still verify; only admin keys may
read them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

VERSION = "v2"
LEGACY_VERSION = "v1"
MAC_HEX_CHARS = 32
#: owner of a job submitted without authentication
NO_OWNER = "-"
#: accepted clock skew between the gateways that issue and the ones that check tokens
MAX_CLOCK_SKEW_S = 60
_TOKEN = re.compile(
    r"(?P<v>v[12])\.(?P<job>[0-9a-f]{32})\.(?P<t>[0-9]{1,12})"
    r"(?:\.(?P<owner>[a-z2-7]{12}|-))?"
    rf"\.(?P<mac>[0-9a-f]{{{MAC_HEX_CHARS}}})"
)


@dataclass(frozen=True)
class AsyncToken:
    job_id: str
    issued_at: int
    text: str
    #: key id of the submitter, ``NO_OWNER`` without authentication, ``None`` for v1 tokens
    owner: str | None = NO_OWNER


def _mac(key: bytes, model_name: str, job_id: str, issued_at: int, owner: str | None) -> str:
    if owner is None:
        message = f"{LEGACY_VERSION}|{model_name}|{job_id}|{issued_at}"
    else:
        message = f"{VERSION}|{model_name}|{job_id}|{issued_at}|{owner}"
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()[:MAC_HEX_CHARS]


def issue_token(
    key: bytes, model_name: str, owner: str = NO_OWNER, now: float | None = None
) -> AsyncToken:
    """A new job id and its token for ``model_name``, readable by ``owner``."""
    job_id = secrets.token_hex(16)
    issued_at = int(time.time() if now is None else now)
    mac = _mac(key, model_name, job_id, issued_at, owner)
    return AsyncToken(job_id, issued_at, f"{VERSION}.{job_id}.{issued_at}.{owner}.{mac}", owner)


def read_token(
    key: bytes, model_name: str, text: str, now: float | None = None
) -> AsyncToken | None:
    """The token if this gateway issued it for ``model_name`` (and not in the future), else None.

    Age is not checked here: a stored result is served for as long as it is stored.
    """
    match = _TOKEN.fullmatch(text)
    if match is None or (match["v"] == VERSION) != (match["owner"] is not None):
        return None
    job_id, issued_at, owner = match["job"], int(match["t"]), match["owner"]
    if not hmac.compare_digest(_mac(key, model_name, job_id, issued_at, owner), match["mac"]):
        return None
    if issued_at > (time.time() if now is None else now) + MAX_CLOCK_SKEW_S:
        return None
    return AsyncToken(job_id, issued_at, text, owner)


def may_read(token: AsyncToken, caller: str | None, is_admin: bool) -> bool:
    """Whether the caller may see the job: its owner (``caller`` is the caller's key id), an
    admin key, or anyone on a gateway without authentication (``caller`` None)."""
    return caller is None or is_admin or token.owner == caller


def may_be_pending(token: AsyncToken, ttl_s: float, now: float | None = None) -> bool:
    """A job this young may still be queued or running (after that: not found)."""
    return (time.time() if now is None else now) - token.issued_at <= ttl_s
