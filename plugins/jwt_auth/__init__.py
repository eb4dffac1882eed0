"""The ``jwt-auth`` filter: verify a bearer JWT at the edge, hand the identity on.

Per request (stage AUTHENTICATE):

1. strip client-supplied identity headers (:mod:`plugins._identity`);
2. read the token (``Authorization: Bearer``, another header, or a cookie); none:
   401 with a bare ``Bearer`` challenge, or, with ``allow_anonymous``, continue with no
   identity;
3. pick the issuer by the token's (unverified) ``iss``, refuse an ``alg`` outside that
   issuer's allow-list and a ``typ`` outside its ``token_types``, verify the signature
   with pyjwt using only that algorithm and the issuer's keys of that type, then the
   claims; a JWKS issuer whose key set never loaded answers 503 (the gateway cannot
   decide);
4. check required scopes/roles (403 ``insufficient_scope``), set ``exchange.identity``
   and inject ``claims_to_headers``.

Whatever the token holds, a refusal is a 401 (or 400/403/503 as above), never a 500.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from types import MappingProxyType
from typing import Any

import jwt
import trio
from jwt.types import Options

from engine.chain import Filter, FilterContext, Stage
from engine.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    ServiceUnavailable,
    Unauthorized,
)
from engine.exchange import Exchange, Identity, checked_field
from engine.metrics import counter
from engine.plugins import hookimpl
from plugins._identity import (
    DEFAULT_IDENTITY_HEADERS,
    HeaderPatterns,
    admit_anonymous,
    challenge,
    challenges,
    fingerprint,
    header_key,
    header_value,
    inject_checked_headers,
    strip_identity_headers,
)

from .claims import (
    AuthFailure,
    check_times,
    claim_at,
    granted_roles,
    granted_scopes,
    matches,
    parse_unverified,
)
from .config import IssuerConfig, JwtAuthConfig, media_type
from .keys import JwksSource, KeySet, VerifyKey

__all__ = ["IssuerConfig", "JwtAuth", "JwtAuthConfig", "filtergate_filters"]

_FAILURES = counter(
    "filtergate_auth_failures_total",
    "Requests refused by an authentication filter, by plugin and reason",
    ("plugin", "reason"),
)


class _Issuer:
    """An issuer's config with its live keys (static ones plus a JWKS URL's)."""

    def __init__(self, config: IssuerConfig, context: FilterContext) -> None:
        self.config = config
        self.static = config.static_keys
        self.jwks: JwksSource | None = None
        if config.jwks_url is not None:
            self.jwks = JwksSource(
                config.jwks_url,
                config.algorithms,
                ttl=config.jwks_ttl,
                cooldown=config.jwks_cooldown,
                timeout=config.jwks_timeout,
                max_bytes=config.jwks_max_size,
                ssl_context=config.tls_context(),
                logger=context.logger,
            )
        audience = config.audience
        self.audience: list[str] | None = (
            [audience] if isinstance(audience, str) else list(audience) if audience else None
        )
        self.types = frozenset(media_type(t) for t in config.token_types)
        required = list(dict.fromkeys([*config.required_claims, config.consumer_claim]))
        # pyjwt's ``require`` only knows top-level names: a dotted path (``user.id``)
        # would never be found there, so those are checked by :func:`claim_at`.
        self.required_paths = tuple(c for c in required if "." in c)
        self.options: Options = {
            "verify_signature": True,
            # Times are checked by claims.check_times against an explicit ``now``.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": self.audience is not None,
            "verify_iss": config.issuer is not None,
            "require": [c for c in required if "." not in c],
        }

    def keyset(self) -> KeySet | None:
        """Static keys plus the JWKS ones; ``None`` if the JWKS never loaded."""
        if self.jwks is None:
            return self.static
        if self.jwks.keys is None:
            return None
        return self.static.union(self.jwks.keys) if len(self.static) else self.jwks.keys

    async def candidates(self, alg: str, kid: str | None) -> tuple[VerifyKey, ...]:
        """Keys to try; refetches the JWKS on an unknown ``kid`` (once per cooldown).

        Raises :class:`AuthFailure` (unknown kid, no key) or ``ServiceUnavailable``
        when the JWKS never loaded.
        """
        keys = self.keyset()
        jwks = self.jwks
        unknown = keys is None or (kid is not None and not keys.knows_kid(kid))
        if jwks is not None and unknown and jwks.may_refetch(trio.current_time()):
            await jwks.refresh()
            keys = self.keyset()
        if keys is None:
            assert jwks is not None
            raise ServiceUnavailable(
                "the identity provider's keys are not available yet",
                retry_after=jwks.retry_after(trio.current_time()) or None,
            )
        return _found(keys, alg, kid)

    def static_candidates(self, alg: str, kid: str | None) -> tuple[VerifyKey, ...]:
        """:meth:`candidates` of an issuer without a JWKS URL: nothing to wait for."""
        assert self.jwks is None
        return _found(self.static, alg, kid)


def _found(keys: KeySet, alg: str, kid: str | None) -> tuple[VerifyKey, ...]:
    found = keys.candidates(alg, kid)
    if not found:
        if kid is not None:
            raise AuthFailure("unknown_kid", "unknown key id")
        raise AuthFailure("no_key", "no key for this token")
    return found


# The verified-token cache's key: the raw value of the token header (all of it, scheme
# included), or ("cookie", token) for a token read from the cookie.
_CacheKey = bytes | tuple[str, str]


class _Verified:
    """What verifying one token gave, and until when it holds."""

    __slots__ = ("headers", "identity", "issuer", "jwks_keys", "until")

    def __init__(
        self,
        identity: Identity,
        headers: list[tuple[bytes, bytes]],
        until: float,
        issuer: _Issuer,
        jwks_keys: object,
    ) -> None:
        self.identity = identity
        self.headers = headers  # claims_to_headers fields: (lowercase name, value)
        self.until = until
        self.issuer = issuer
        self.jwks_keys = jwks_keys

    def still_valid(self, now: float) -> bool:
        jwks = self.issuer.jwks
        return now < self.until and (jwks is None or jwks.keys is self.jwks_keys)


class JwtAuth(Filter):
    """Verifies a JWT bearer token; see the module docstring for the contract."""

    name = "jwt-auth"
    stage = Stage.AUTHENTICATE
    Config = JwtAuthConfig

    def __init__(self, config: JwtAuthConfig, context: FilterContext) -> None:
        super().__init__(config, context)
        self.config: JwtAuthConfig = config
        self.log = context.logger
        self.issuers = [_Issuer(c, context) for c in config.issuers]
        self.by_iss = {i.config.issuer: i for i in self.issuers}
        self.default_issuer = self.by_iss.get(None)
        self.strip = HeaderPatterns(
            [*DEFAULT_IDENTITY_HEADERS, *config.strip_headers, *config.claims_to_headers.values()]
        )
        # Also stripped on open routes to the same upstream (the engine's hygiene).
        self.identity_headers = self.strip
        self._header = config.header.lower().encode() if config.header else None
        # Read here, so never stripped as an identity header on this filter's routes.
        self.credential_headers = frozenset({self._header}) if self._header else frozenset()
        # The challenge of a request without credentials (RFC 6750 3.1: no error=).
        self._challenge = challenge("Bearer", config.realm)
        self._scheme = config.scheme.lower().encode()
        # The plain spelling of the header, "Bearer " then the token (see _credential).
        self._plain_prefix = config.scheme.encode() + b" " if config.scheme else b""
        # The token header's raw value (or ("cookie", token)) -> what verifying the token
        # gave; bounded, oldest first out (see _remember).
        self._verified: OrderedDict[_CacheKey, _Verified] = OrderedDict()
        # Static keys only: verifying never waits, so the engine calls the request phase
        # instead of making and awaiting a coroutine per request.
        self._static = all(issuer.jwks is None for issuer in self.issuers)
        if self._static:
            vars(self)["on_request"] = self._authenticate

    async def setup(self) -> None:
        """Fetch every JWKS URL once; a provider that is down does not stop start-up."""
        async with trio.open_nursery() as nursery:
            for issuer in self.issuers:
                if issuer.jwks is not None:
                    nursery.start_soon(issuer.jwks.refresh)

    async def background(self) -> None:
        """Keep every JWKS URL's key set fresh for as long as the instance is in use."""
        async with trio.open_nursery() as nursery:
            for issuer in self.issuers:
                if issuer.jwks is not None:
                    nursery.start_soon(issuer.jwks.serve_refresh)

    async def on_request(self, exchange: Exchange) -> None:
        """Strip spoofable headers, read the token, verify it (or recall it), admit it.

        When no issuer has a JWKS URL nothing here ever waits, and the instance's
        ``on_request`` is :meth:`_authenticate` itself, a plain call.
        """
        found = self._authenticate(exchange)
        if found is None:
            return
        token, key = found
        now = time.time()
        try:
            claims, issuer = await self.verify(token, now)
            verified = self._remember(key, claims, issuer, now)
        except ServiceUnavailable:
            _FAILURES.inc(plugin=self.name, reason="keys_unavailable")
            raise
        except AuthFailure as e:
            raise self._refusal(e, token, exchange) from None
        self._admit(exchange, verified)

    def _authenticate(self, exchange: Exchange) -> tuple[str, _CacheKey] | None:
        """All of :meth:`on_request` that cannot wait.

        Returns the token and its cache key when it still needs a verification that may
        wait (an issuer with a JWKS URL); ``None`` when the request was admitted (or is
        anonymous). Raises the refusals.
        """
        strip = self.strip
        if strip.any_of(exchange.request.headers.items):  # else strip_identity_headers is a no-op
            strip_identity_headers(exchange, strip, self.credential_headers)
        if exchange.identity is not None and self.config.skip_if_authenticated:
            # Identified already (either credential is enough): a token sent too is not
            # checked, so it is not forwarded either (upstreams read claims from it).
            self._remove_token(exchange)
            return None
        # Wall-clock time: exp/nbf/iat are seconds since the epoch, not intervals.
        now = time.time()
        raw = self._header_field(exchange) if self._header is not None else None
        # The common case: a token seen before, found by the header's raw value
        # without parsing it again (the same value always holds the same token).
        if raw is not None and self._recall(raw, exchange, now):
            return None
        found = self._credential(exchange, raw)
        if found is None:
            if self.config.allow_anonymous:
                admit_anonymous(exchange, self._challenge)
                return None
            _FAILURES.inc(plugin=self.name, reason="missing")
            raise Unauthorized(
                "authentication required",
                headers=challenges(exchange, self._challenge),
            )
        token, key = found
        if key is not raw and self._recall(key, exchange, now):  # from the cookie
            return None
        if not self._static:
            return found
        try:
            claims, issuer = self._verify_static(token, now)
            known = self._remember(key, claims, issuer, now)
        except AuthFailure as e:
            raise self._refusal(e, token, exchange) from None
        self._admit(exchange, known)
        return None

    def _recall(self, key: _CacheKey, exchange: Exchange, now: float) -> bool:
        """Admit ``exchange`` on a still valid earlier verification of ``key``'s token."""
        known = self._verified.get(key)
        if known is None or not known.still_valid(now):
            return False
        self._admit(exchange, known)
        return True

    def _admit(self, exchange: Exchange, verified: _Verified) -> None:
        exchange.identity = verified.identity
        if verified.headers:
            inject_checked_headers(exchange, verified.headers)
        if self.config.hide_credentials:
            self.remove_credentials(exchange)

    def _refusal(self, e: AuthFailure, token: str, exchange: Exchange) -> GatewayError:
        """The 401 (or 403) to answer a token refused for ``e``; counted and logged."""
        _FAILURES.inc(plugin=self.name, reason=e.reason)
        self.log.debug(
            "refused token %s on route %s: %s",
            fingerprint(token),
            exchange.route.name if exchange.route is not None else "-",
            e.reason,
        )
        if e.status == 403:
            scope = " ".join(self.config.required_scopes) or None
            return Forbidden(
                e.description,
                headers=[
                    challenge(
                        "Bearer", self.config.realm, "insufficient_scope", e.description, scope
                    )
                ],
            )
        return Unauthorized(
            f"invalid token: {e.description}",
            headers=[challenge("Bearer", self.config.realm, "invalid_token", e.description)],
        )

    def _remember(
        self, key: _CacheKey, claims: dict[str, Any], issuer: _Issuer, now: float
    ) -> _Verified:
        """What verifying a token gave, kept under ``key`` until it could first change.

        Raises :class:`AuthFailure` when a claim cannot be sent as a header.

        That is its expiry (plus leeway), its ``max_age``, or a minute without ``exp``;
        and only while the issuer's JWKS key set is the one that verified it (a
        rotation that drops the key invalidates the entry). Not kept with
        ``cache_size = 0``.
        """
        identity = self.identity(claims, issuer)
        # Checked once here, not on every request that reuses them.
        headers = [checked_field(header_key(n), v) for n, v in self.headers_for(claims)]
        cfg = issuer.config
        until = now + 60.0
        exp = claims.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            until = min(until, exp + cfg.leeway)
        iat = claims.get("iat")
        if cfg.max_age is not None and isinstance(iat, int | float):
            until = min(until, iat + cfg.max_age + cfg.leeway)
        jwks_keys = issuer.jwks.keys if issuer.jwks is not None else None
        verified = _Verified(identity, headers, until, issuer, jwks_keys)
        size = self.config.cache_size
        if size > 0:
            cache = self._verified
            cache[key] = verified
            while len(cache) > size:
                cache.popitem(last=False)
        return verified

    def read_token(self, exchange: Exchange) -> str | None:
        """The token from the header, else the cookie; ``None`` when there is none.

        Raises ``BadRequest`` (``invalid_request``) when the credential is ambiguous
        (the header twice, the cookie twice).
        """
        raw = self._header_field(exchange) if self._header is not None else None
        found = self._credential(exchange, raw)
        return found[0] if found is not None else None

    def _header_field(self, exchange: Exchange) -> bytes | None:
        """The raw value of the token header, ``None`` without one; raises
        ``BadRequest`` when there are several."""
        key = self._header
        value = None
        for name, v in exchange.request.headers.items:
            if name == key:
                if value is not None:
                    self._invalid_request(f"more than one {self.config.header} header")
                value = v
        return value

    def _credential(self, exchange: Exchange, raw: bytes | None) -> tuple[str, _CacheKey] | None:
        """The token (from ``raw``, the token header's value, else from the cookie) and
        the key of the verified-token cache for it: ``raw`` itself, or, for a cookie,
        ``("cookie", token)`` (the same text in the header would be another token)."""
        if raw is not None:
            token = self._token_from_header(raw)
            if token is not None:
                # The raw value is the key (found again without parsing) only in its
                # plain form, "Bearer token": other spellings (whitespace, case) would
                # each hold an entry of their own, up to max_token_size bytes apiece,
                # for one token. Those are keyed by the token itself.
                prefix = self._plain_prefix
                if len(raw) == len(prefix) + len(token) and raw.startswith(prefix):
                    return token, raw
                return token, ("header", token)
        if self.config.cookie is not None:
            found = _cookies(exchange.request.headers.get_all(b"cookie"), self.config.cookie)
            if len(found) > 1:
                self._invalid_request(f"more than one {self.config.cookie} cookie")
            if found and found[0]:
                return found[0], ("cookie", found[0])
        return None

    def _token_from_header(self, value: bytes) -> str | None:
        value = value.strip()
        if self._scheme:
            # Any whitespace ends the scheme: "Bearer<TAB>token" is a token to upstreams
            # that split on it, so it must be one here (verified, never passed on unread).
            scheme, *rest = value.split(None, 1)
            if scheme.lower() != self._scheme:
                return None  # another scheme (Basic ...): no bearer credentials
            value = rest[0].strip() if rest else b""
        # Not token68 (RFC 9110 §11.2)? Still a token, a malformed one: verify refuses it.
        return value.decode("latin-1") or None

    def _invalid_request(self, description: str) -> None:
        _FAILURES.inc(plugin=self.name, reason="ambiguous")
        raise BadRequest(
            description,
            headers=[challenge("Bearer", self.config.realm, "invalid_request", description)],
            close=False,
        )

    async def verify(self, token: str, now: float) -> tuple[dict[str, Any], _Issuer]:
        """The verified claims of ``token`` at ``now`` (seconds since the epoch), and
        the issuer that vouched for them.

        Raises :class:`AuthFailure` (401/403), or ``ServiceUnavailable`` when the
        issuer's key set never loaded. Never anything else, whatever ``token`` is.
        """
        issuer, alg, kid = self._issuer_of(token)
        candidates = await issuer.candidates(alg, kid)
        return self._check(token, now, issuer, candidates), issuer

    def _verify_static(self, token: str, now: float) -> tuple[dict[str, Any], _Issuer]:
        """:meth:`verify` when no issuer has a JWKS URL: nothing to wait for."""
        issuer, alg, kid = self._issuer_of(token)
        return self._check(token, now, issuer, issuer.static_candidates(alg, kid)), issuer

    def _issuer_of(self, token: str) -> tuple[_Issuer, str, str | None]:
        """The issuer to verify ``token`` with, its ``alg`` and ``kid``, from its
        (unverified) header and ``iss``; raises :class:`AuthFailure`."""
        if len(token) > self.config.max_token_size:
            raise AuthFailure("too_large", "the token is too large")
        header, unverified = parse_unverified(token)
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str):
            raise AuthFailure("malformed", "malformed token")
        if kid is not None and not isinstance(kid, str):
            raise AuthFailure("malformed", "malformed token")
        iss = unverified.get("iss")
        if iss is not None and not isinstance(iss, str):
            raise AuthFailure("bad_claim", "the iss claim is not a string")
        issuer = self.by_iss.get(iss) if iss is not None else None
        if issuer is None:
            issuer = self.default_issuer
        if issuer is None:
            raise AuthFailure("untrusted_issuer", "untrusted issuer")
        if alg not in issuer.config.algorithms:
            raise AuthFailure("bad_algorithm", "algorithm not allowed")
        typ = header.get("typ")
        if (
            typ is not None
            and issuer.types
            and (not isinstance(typ, str) or media_type(typ) not in issuer.types)
        ):
            raise AuthFailure("bad_type", "unexpected token type")
        return issuer, alg, kid

    def _check(
        self, token: str, now: float, issuer: _Issuer, candidates: tuple[VerifyKey, ...]
    ) -> dict[str, Any]:
        """The claims of ``token``, its signature, times, consumer and grants checked."""
        cfg = issuer.config
        claims = _decode(token, candidates, issuer)
        for path in issuer.required_paths:  # absent or null, as pyjwt's ``require``
            if claim_at(claims, path) is None:
                raise AuthFailure("missing_claim", f"the token has no {path} claim")
        check_times(
            claims, now, leeway=cfg.leeway, require_exp=cfg.require_exp, max_age=cfg.max_age
        )
        consumer = claim_at(claims, cfg.consumer_claim)
        if not isinstance(consumer, str) or not consumer:
            raise AuthFailure("bad_claim", f"the {cfg.consumer_claim} claim is not a string")
        self.authorize(claims, issuer)
        return claims

    def authorize(self, claims: dict[str, Any], issuer: _Issuer) -> None:
        """Raise a 403 :class:`AuthFailure` unless the claims grant the required
        scopes and roles."""
        cfg = self.config
        if cfg.required_scopes and not matches(
            cfg.required_scopes, granted_scopes(claims), cfg.scope_match
        ):
            raise AuthFailure("insufficient_scope", "insufficient scope", status=403)
        if cfg.required_roles:
            roles = granted_roles(claims, issuer.config.roles_claims)
            if not matches(cfg.required_roles, roles, cfg.role_match):
                raise AuthFailure("insufficient_role", "insufficient role", status=403)

    def identity(self, claims: dict[str, Any], issuer: _Issuer) -> Identity:
        consumer = claim_at(claims, issuer.config.consumer_claim)
        return Identity(
            consumer=issuer.config.consumer_prefix + str(consumer),
            groups=granted_roles(claims, issuer.config.roles_claims),
            scopes=granted_scopes(claims),
            claims=MappingProxyType(claims),
            source=self.name,
        )

    def headers_for(self, claims: dict[str, Any]) -> list[tuple[str, bytes]]:
        """``claims_to_headers`` as header fields; a claim that is absent is skipped.

        Raises :class:`AuthFailure` when a present claim cannot be a header value
        (fail closed rather than forward a mangled identity).
        """
        out = []
        for claim, name in self.config.claims_to_headers.items():
            value = claim_at(claims, claim)
            if value is None:
                continue
            encoded = header_value(value)
            if encoded is None:
                raise AuthFailure("bad_claim", f"the {claim} claim cannot be sent as a header")
            out.append((name, encoded))
        return out

    def _remove_token(self, exchange: Exchange) -> None:
        """Remove what this filter would read as a token, and nothing else: the header
        only when it carries this scheme (not the Basic credentials meant for the
        upstream, nor another plugin's key), and the cookie."""
        headers = exchange.request.headers
        name = self._header
        if name is not None:  # every field of it: nothing checked duplicates on this path
            headers.items = [
                (n, v) for n, v in headers.items if n != name or self._token_from_header(v) is None
            ]
        if self.config.cookie is not None:
            _remove_cookie(headers.items, self.config.cookie)

    def remove_credentials(self, exchange: Exchange) -> None:
        headers = exchange.request.headers
        if self._header is not None:
            headers.remove(self._header)
        if self.config.cookie is not None:
            _remove_cookie(headers.items, self.config.cookie)


def _decode(token: str, candidates: tuple[VerifyKey, ...], issuer: _Issuer) -> dict[str, Any]:
    """Verify ``token`` with the first candidate key whose signature matches."""
    cfg = issuer.config
    last: AuthFailure = AuthFailure("bad_signature", "invalid signature")
    for key in candidates:
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[key.alg],
                options=issuer.options,
                audience=issuer.audience,
                issuer=cfg.issuer,
            )
        except jwt.InvalidSignatureError:
            continue
        except jwt.InvalidAlgorithmError:
            last = AuthFailure("bad_algorithm", "algorithm not allowed")
            continue
        except jwt.InvalidAudienceError:
            raise AuthFailure("bad_audience", "invalid audience") from None
        except jwt.InvalidIssuerError:
            raise AuthFailure("untrusted_issuer", "untrusted issuer") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthFailure("missing_claim", f"the token has no {e.claim} claim") from None
        except jwt.PyJWTError:
            raise AuthFailure("malformed", "malformed token") from None
        except Exception:
            # Garbage can reach code paths pyjwt does not wrap (key loading, JSON types):
            # still the client's fault, never a 500.
            raise AuthFailure("malformed", "malformed token") from None
        if not isinstance(claims, dict):
            raise AuthFailure("malformed", "malformed token")
        return claims
    raise last


def _cookies(values: list[bytes], name: str) -> list[str]:
    """Every value of cookie ``name`` in the Cookie header fields ``values``."""
    key = name.encode("latin-1")
    out = []
    for value in values:
        for pair in value.split(b";"):
            # "token =x" is the cookie "token" to the servers behind (they trim the name):
            # it must be to the gateway too, or it would pass unverified.
            k, sep, v = pair.partition(b"=")
            if sep and k.strip() == key:
                out.append(v.strip().strip(b'"').decode("latin-1"))
    return out


def _remove_cookie(items: list[tuple[bytes, bytes]], name: str) -> None:
    key = name.encode("latin-1")
    for i, (n, v) in enumerate(items):
        if n != b"cookie":
            continue
        kept = [p for p in v.split(b";") if p.partition(b"=")[0].strip() != key]
        items[i] = (n, b";".join(kept).strip())
    items[:] = [(n, v) for n, v in items if n != b"cookie" or v]


@hookimpl
def filtergate_filters() -> list[type[Filter]]:
    return [JwtAuth]
