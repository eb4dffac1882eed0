"""Identity hygiene shared by the authenticate-stage plugins (jwt-auth, key-auth).

A gateway that injects ``X-User-Id`` for its services must first remove any
``X-User-Id`` the client sent, or a client could impersonate anyone by sending the
header itself. Each auth filter therefore:

1. strips every client-supplied identity header (:data:`DEFAULT_IDENTITY_HEADERS`, the
   filter's own ``strip_headers`` and every header it may inject) before it looks at
   credentials, whatever the outcome (anonymous requests are stripped too);
2. injects the verified values with :func:`inject_header`, which records the names in
   the exchange's stash so that a second auth filter on the same route does not strip
   what the first one injected.

This module starts with ``_`` so the engine does not register it as a plugin.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

from engine.exchange import FRAMING_HEADERS, Exchange, StashKey

__all__ = [
    "DEFAULT_IDENTITY_HEADERS",
    "INJECTED_HEADERS",
    "HeaderPatterns",
    "admit_anonymous",
    "challenge",
    "challenges",
    "check_header_name",
    "check_header_pattern",
    "fingerprint",
    "header_key",
    "header_value",
    "inject_checked_headers",
    "inject_header",
    "inject_headers",
    "strip_identity_headers",
]

DEFAULT_IDENTITY_HEADERS: tuple[str, ...] = (
    # Conventional names services read the caller from; a trailing "*" is a prefix.
    "X-User-Id",
    "X-User-Name",
    "X-User-Email",
    "X-User-Groups",
    "X-User-Roles",
    "X-User-Scopes",
    "X-Consumer-*",  # Kong's X-Consumer-Id, -Username, -Custom-Id, -Groups
    "X-Credential-*",  # Kong's X-Credential-Identifier
    "X-Anonymous-Consumer",
    "X-Auth-*",
    "X-Authenticated-*",  # X-Authenticated-User, -Userid, -Scope, -Groups
    "X-Forwarded-User",  # oauth2-proxy and friends
    "X-Forwarded-Email",
    "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username",
    "X-Forwarded-Access-Token",
    "X-Remote-User",  # Apache/nginx auth modules
    "X-Remote-Group",
    "X-Remote-Groups",
    "Remote-User",
    "X-Userinfo",  # Kong OIDC
    "X-Jwt-Claim-*",
    "X-Identity-*",
)
"""Client-supplied headers removed before authentication (the README lists them)."""

INJECTED_HEADERS: StashKey[set[bytes]] = StashKey("identity.injected_headers")
"""Names (lowercase bytes) of the headers an auth filter injected on this exchange."""

_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def check_header_name(name: str) -> str | None:
    """An error message if ``name`` is not a valid header field name, else ``None``."""
    if not _TOKEN_RE.match(name):
        return f"not a valid header name: {name!r}"
    return None


def check_injected_header_name(name: str) -> str | None:
    """:func:`check_header_name` for a header an auth filter sets on the request: also
    refuses the framing headers and ``Host``, which the gateway writes itself."""
    if problem := check_header_name(name):
        return problem
    if name.lower() in FRAMING_HEADERS or name.lower() == "host":
        return f"{name!r} is managed by the gateway"
    return None


def check_header_pattern(pattern: str) -> str | None:
    """Like :func:`check_header_name`, also allowing one trailing ``*`` (a prefix)."""
    name = pattern[:-1] if pattern.endswith("*") else pattern
    if not name or "*" in name or not _TOKEN_RE.match(name):
        return f'not a valid header name or prefix like "X-User-*": {pattern!r}'
    return None


class HeaderPatterns:
    """A set of header names and ``Prefix-*`` patterns, matched case-insensitively.

    Calling the object with a lowercase ``bytes`` name says whether it matches;
    :meth:`any_of` whether any field of a header list does.
    """

    __slots__ = ("exact", "heads", "prefixes", "width")

    def __init__(self, patterns: Iterable[str]) -> None:
        exact: set[bytes] = set()
        prefixes: set[bytes] = set()
        for p in patterns:
            low = p.lower().encode("latin-1")
            if low.endswith(b"*"):
                prefixes.add(low[:-1])
            else:
                exact.add(low)
        self.exact = frozenset(exact)
        self.prefixes = tuple(sorted(prefixes))
        # A name can start with a prefix only if its first ``width`` bytes are one of
        # ``heads``: a set lookup that spares most names the startswith over every prefix.
        self.width = min((len(p) for p in self.prefixes), default=0)
        self.heads = frozenset(p[: self.width] for p in self.prefixes)

    def __call__(self, name: bytes) -> bool:
        return name in self.exact or (
            name[: self.width] in self.heads and name.startswith(self.prefixes)
        )

    def any_of(self, fields: Iterable[tuple[bytes, bytes]]) -> bool:
        """Whether the name of any ``(lowercase name, value)`` field matches."""
        exact, heads, width, prefixes = self.exact, self.heads, self.width, self.prefixes
        for name, _value in fields:
            if name in exact or (name[:width] in heads and name.startswith(prefixes)):
                return True
        return False


def strip_identity_headers(
    exchange: Exchange, patterns: HeaderPatterns, own: frozenset[bytes] = frozenset()
) -> int:
    """Remove the request headers matching ``patterns``; returns how many were removed.

    Kept: headers an earlier auth filter injected on this exchange, the calling filter's
    ``own`` credential headers, and those of every other filter on the exchange's route
    (``exchange.credential_headers``, from each filter's ``credential_headers``), so that
    one filter's strip list (say ``X-Auth-*``) cannot remove another filter's credential
    (an ``X-Auth-Key`` read by key-auth) on a route that has both. On a route where no
    filter reads it, such a header is stripped like any other.
    """
    headers = exchange.request.headers
    if not patterns.any_of(headers.items):  # the common case: clients rarely send one
        return 0
    injected = exchange.stash.get(INJECTED_HEADERS) or ()
    credentials = exchange.credential_headers

    def spoofable(name: bytes) -> bool:
        return (
            patterns(name) and name not in own and name not in credentials and name not in injected
        )

    return headers.remove_where(spoofable)


def header_key(name: str) -> bytes:
    """A configured header name as the exchange's headers hold it: lowercase bytes."""
    return name.lower().encode("latin-1")


def inject_header(exchange: Exchange, name: str, value: bytes) -> None:
    """Set request header ``name`` to ``value`` and remember it was injected."""
    inject_headers(exchange, [(header_key(name), value)])


def inject_headers(exchange: Exchange, fields: Iterable[tuple[bytes, bytes]]) -> None:
    """Set each request header ``(lowercase name, value)`` and remember it was injected.

    For the fields an auth filter prepared at load or at verification time; the
    remembered set is made on the first field, as :func:`inject_header` does.
    """
    headers = exchange.request.headers
    injected: set[bytes] | None = None
    for key, value in fields:
        headers.set(key, value)
        if injected is None:
            injected = exchange.stash.get(INJECTED_HEADERS)
            if injected is None:
                injected = set()
                exchange.stash[INJECTED_HEADERS] = injected
        injected.add(key)


def inject_checked_headers(exchange: Exchange, fields: Sequence[tuple[bytes, bytes]]) -> None:
    """:func:`inject_headers` for fields :func:`engine.exchange.checked_field` returned:
    they are set without being checked again."""
    if not fields:
        return
    headers = exchange.request.headers
    stash = exchange.stash
    injected = stash.get(INJECTED_HEADERS)
    if injected is None:
        injected = set()
        stash[INJECTED_HEADERS] = injected
    for field in fields:
        headers.set_checked(field)
        injected.add(field[0])


_UNSAFE_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def header_value(value: object) -> bytes | None:
    """``value`` (a claim or a consumer field) as a header value, or ``None``.

    Strings are UTF-8 encoded, numbers written out, flat lists of those joined by ``,``.
    ``None`` when the value cannot be a header (a table, a control character, a
    leading or trailing space): the caller fails closed rather than forward a
    mangled identity.
    """
    if isinstance(value, list | tuple):
        parts = [_scalar(v) for v in value]
        if any(p is None or b"," in p for p in parts):
            return None
        return b",".join(p for p in parts if p is not None)
    return _scalar(value)


def _scalar(value: object) -> bytes | None:
    if isinstance(value, bool):
        out = b"true" if value else b"false"
    elif isinstance(value, str):
        out = value.encode("utf-8", "replace")
    elif isinstance(value, int | float):
        try:
            out = str(value).encode()
        except ValueError:  # an int too long to write out (sys.set_int_max_str_digits)
            return None
    else:
        return None
    if _UNSAFE_VALUE.search(out) or out != out.strip(b" \t"):
        return None
    return out


def fingerprint(credential: str | bytes) -> str:
    """A short, non-reversible tag for a credential, safe to log: ``sha256:`` + 12 hex."""
    raw = credential.encode("utf-8", "replace") if isinstance(credential, str) else credential
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:12]


def _quoted(text: str) -> str:
    # A quoted-string (RFC 9110 §5.6.4) without escapes: drop what would need one.
    return "".join(c for c in text if c not in '"\\' and 0x20 <= ord(c) < 0x7F)


def challenge(
    scheme: str,
    realm: str,
    error: str | None = None,
    description: str | None = None,
    scope: str | None = None,
) -> tuple[bytes, bytes]:
    """A ``www-authenticate`` header field, e.g. ``Bearer realm="x", error="invalid_token"``.

    Per RFC 6750 §3.1, ``error`` is omitted when the request carried no credentials.
    """
    params = [f'realm="{_quoted(realm)}"']
    if error:
        params.append(f'error="{_quoted(error)}"')
    if description:
        params.append(f'error_description="{_quoted(description)}"')
    if scope:
        params.append(f'scope="{_quoted(scope)}"')
    return b"www-authenticate", f"{scheme} {', '.join(params)}".encode("ascii")


# The challenges of auth filters that let a caller without their credential through
# (allow_anonymous): a later one's 401 offers them too, so a client told "no
# credential" learns every scheme the route accepts (RFC 9110 11.6.1: one
# WWW-Authenticate field per challenge).
_OFFERED: StashKey[list[tuple[bytes, bytes]]] = StashKey("auth.challenges")


def admit_anonymous(exchange: Exchange, offered: tuple[bytes, bytes]) -> None:
    """Note that an auth filter let ``exchange`` through without its credential, and the
    challenge (:func:`challenge`) it would have answered with."""
    exchange.stash.setdefault(_OFFERED, []).append(offered)


def challenges(exchange: Exchange, own: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """The ``www-authenticate`` fields of a 401 for a missing credential: those of the
    earlier auth filters that admitted the caller anonymously, then ``own``."""
    offered = exchange.stash.get(_OFFERED)
    return [*offered, own] if offered else [own]
