"""Pure checks on a token's parts and claims: no IO, no clock (``now`` is an argument).

Every rejection is an :class:`AuthFailure` whose ``reason`` is a short fixed label (for
metrics and logs) and whose ``description`` is a fixed sentence safe to send to the
client; neither ever contains a piece of the token.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from plugins._json import NotJson, load_json

__all__ = [
    "AuthFailure",
    "check_times",
    "claim_at",
    "granted_roles",
    "granted_scopes",
    "matches",
    "parse_unverified",
]


class AuthFailure(Exception):
    """A token is refused. ``status`` 401 (invalid token) or 403 (insufficient scope)."""

    def __init__(self, reason: str, description: str, status: int = 401) -> None:
        self.reason = reason
        self.description = description
        self.status = status
        super().__init__(description)


_SEGMENT_RE = re.compile(rb"^[A-Za-z0-9_-]*$")


def _b64url(segment: bytes) -> bytes:
    if not _SEGMENT_RE.match(segment) or len(segment) % 4 == 1:
        raise AuthFailure("malformed", "malformed token")
    try:
        return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise AuthFailure("malformed", "malformed token") from None


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = load_json(data)  # no NaN or Infinity claims (RFC 8259, RFC 7519 2)
    except NotJson:
        raise AuthFailure("malformed", "malformed token") from None
    if not isinstance(value, dict):
        raise AuthFailure("malformed", "malformed token")
    return value


def parse_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and payload of a compact JWS, NOT verified: only to pick the issuer
    and key. Raises :class:`AuthFailure` ``malformed`` for anything else (JWE, a JSON
    array payload, bad base64, an unpadded-length segment ...)."""
    raw = token.encode("ascii", "replace")
    parts = raw.split(b".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise AuthFailure("malformed", "malformed token")
    header = _json_object(_b64url(parts[0]))
    payload = _json_object(_b64url(parts[1]))
    _b64url(parts[2])
    return header, payload


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthFailure("bad_claim", f"the {name} claim is not a number")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any date
        raise AuthFailure("bad_claim", f"the {name} claim is not a number") from None
    if not math.isfinite(number):
        raise AuthFailure("bad_claim", f"the {name} claim is not a number")
    return number


def check_times(
    claims: Mapping[str, Any],
    now: float,
    *,
    leeway: float,
    require_exp: bool,
    max_age: float | None,
) -> None:
    """Check ``exp``, ``nbf`` and ``iat`` against ``now`` (seconds since the epoch).

    ``leeway`` absorbs clock skew between the issuer and the gateway in every
    comparison. ``max_age`` refuses tokens issued longer ago (needs ``iat``).
    """
    exp = _number(claims, "exp")
    nbf = _number(claims, "nbf")
    iat = _number(claims, "iat")
    if exp is None:
        if require_exp:
            raise AuthFailure("missing_claim", "the token has no exp claim")
    elif now >= exp + leeway:
        raise AuthFailure("expired", "the token has expired")
    if nbf is not None and now + leeway < nbf:
        raise AuthFailure("not_yet_valid", "the token is not valid yet")
    if iat is not None and now + leeway < iat:
        raise AuthFailure("not_yet_valid", "the token was issued in the future")
    if max_age is not None:
        if iat is None:
            raise AuthFailure("missing_claim", "the token has no iat claim")
        if now - iat > max_age + leeway:
            raise AuthFailure("too_old", "the token is too old")


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The claim at ``path``: a name, or a dotted path into nested objects
    (``realm_access.roles``). A claim whose own name contains the dots wins."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _strings(value: object, sep: str | None) -> list[str]:
    if isinstance(value, str):
        return value.split(sep) if sep is not None else value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def granted_scopes(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """Scopes from ``scope`` (space-separated, RFC 8693) and ``scp`` (a list or a string)."""
    out = _strings(claims.get("scope"), None) + _strings(claims.get("scp"), None)
    return tuple(dict.fromkeys(s for s in out if s))


def granted_roles(claims: Mapping[str, Any], paths: Iterable[str]) -> tuple[str, ...]:
    """Roles/groups from the claims at ``paths``: lists of strings, or one string
    (split on spaces or commas)."""
    out: list[str] = []
    for path in paths:
        value = claim_at(claims, path)
        if isinstance(value, str):
            out.extend(v for v in re.split(r"[\s,]+", value) if v)
        else:
            out.extend(_strings(value, None))
    return tuple(dict.fromkeys(out))


def matches(required: Iterable[str], granted: Iterable[str], mode: Literal["any", "all"]) -> bool:
    """Whether ``granted`` satisfies ``required`` (nothing required always does)."""
    need = list(required)
    if not need:
        return True
    have = set(granted)
    if mode == "all":
        return all(r in have for r in need)
    return any(r in have for r in need)
