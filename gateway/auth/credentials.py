"""API keys and their tokens: ``rti_<key id>_<secret>``, the scrypt hash the catalog stores, the
principal a verified key yields, and the 401/503 errors of authentication.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from gateway.errors import Unauthorized

TOKEN_PREFIX = "rti"


KEY_ID_LENGTH = 12


SECRET_BYTES = 32


_TOKEN = re.compile(r"rti_(?P<key_id>[a-z2-7]{12})_(?P<secret>[A-Za-z0-9_-]{43})")


#: scrypt cost: N=2**14, r=8 (16 MiB), p=1 -- the classic interactive-login setting, 55 ms
#: on a 2-core box. Verification reads the parameters from the stored hash, so raising them
#: later only affects new keys.
SCRYPT_N = 2**14


SCRYPT_R = 8


SCRYPT_P = 1


_SALT_BYTES = 16


_HASH_BYTES = 32


#: refuse stored parameters that would need more memory than this (128 * n * r * p bytes)
_SCRYPT_MAX_MEM = 64 * 1024 * 1024


@dataclass(frozen=True)
class ApiKey:
    """An authenticated caller."""

    key_id: str
    name: str
    is_admin: bool
    #: requests per second; ``None`` = no per-key limit
    rate_limit_per_s: float | None


@dataclass(frozen=True)
class ApiKeyRecord(ApiKey):
    """A row of ``api_keys`` as listed by operators."""

    created_at: datetime
    revoked_at: datetime | None


class AuthError(Unauthorized):
    """The request is not authenticated: 401 (``status``, ``code``, ``message``, ``headers``
    of :class:`gateway.errors.GatewayError`, rendered by the gateway's one error handler)."""

    @property
    def headers(self) -> dict[str, str]:
        """The RFC 6750 challenge every 401 carries."""
        return {"WWW-Authenticate": 'Bearer realm="rtinfer"'}


class MissingCredentials(AuthError):
    code = "missing_api_key"

    def __init__(self) -> None:
        super().__init__(
            "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        )


class MalformedToken(AuthError):
    code = "malformed_api_key"

    def __init__(self, message: str = "malformed API key: expected rti_<key id>_<secret>") -> None:
        super().__init__(message)


class InvalidApiKey(AuthError):
    """Unknown key id, revoked key or wrong secret: deliberately indistinguishable."""

    code = "invalid_api_key"

    def __init__(self) -> None:
        super().__init__("invalid API key")


class AuthUnavailable(AuthError):
    """The key store cannot be reached and the key is not in the cache: 503, not 401, since
    the key may well be valid."""

    status = 503
    code = "auth_unavailable"

    def __init__(self) -> None:
        super().__init__("cannot verify the API key right now (key store unavailable); retry")

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class KeyNotFound(LookupError):
    """No ``api_keys`` row with this key id."""


def new_token() -> tuple[str, str, str]:
    """A fresh ``(key_id, secret, token)``."""
    key_id = base64.b32encode(secrets.token_bytes(10)).decode().lower()[:KEY_ID_LENGTH]
    secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).decode().rstrip("=")
    return key_id, secret, format_token(key_id, secret)


def format_token(key_id: str, secret: str) -> str:
    return f"{TOKEN_PREFIX}_{key_id}_{secret}"


def parse_token(token: str) -> tuple[str, str]:
    """``(key_id, secret)`` of a well-formed token; :class:`MalformedToken` otherwise."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise MalformedToken()
    return match["key_id"], match["secret"]


def hash_secret(secret: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$n$r$p$salt$hash`` of ``secret`` with a fresh random salt."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(secret, salt, n, r, p, _HASH_BYTES)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, encoded: str) -> bool:
    """Whether ``secret`` matches ``encoded`` (constant-time compare); ``ValueError`` if
    ``encoded`` is not a hash this module wrote."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not an scrypt$n$r$p$salt$hash string")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, expected = _unb64(parts[4]), _unb64(parts[5])
    except ValueError as exc:
        raise ValueError(f"corrupt scrypt hash: {exc}") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * n * r * p > _SCRYPT_MAX_MEM:
        raise ValueError(f"unsupported scrypt parameters n={n} r={r} p={p}")
    if not salt or not expected:
        raise ValueError("corrupt scrypt hash: empty salt or hash")
    return hmac.compare_digest(_scrypt(secret, salt, n, r, p, len(expected)), expected)


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(
        secret.encode(), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=_SCRYPT_MAX_MEM + 2**20
    )


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def extract_token(headers: Mapping[str, str]) -> str:
    """The token of ``Authorization: Bearer <token>`` or else ``X-API-Key: <token>``."""
    authorization = (_header(headers, "authorization") or "").strip()
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        if not value.strip():
            raise MalformedToken("malformed Authorization header: empty bearer token")
        return value.strip()
    api_key = (_header(headers, "x-api-key") or "").strip()
    if api_key:
        return api_key
    if authorization:
        raise MalformedToken(
            f"unsupported Authorization scheme {scheme[:20]!r}: use 'Bearer <key>' or X-API-Key"
        )
    raise MissingCredentials()


def _header(headers: Mapping[str, str], lower_name: str) -> str | None:
    """Case-insensitive header lookup (Starlette's ``Headers`` already is; a dict may not be)."""
    value = headers.get(lower_name)
    if value is not None:
        return value
    for name, value in headers.items():
        if name.lower() == lower_name:
            return value
    return None
