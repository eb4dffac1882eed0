"""The jwt-auth config schema: ``[plugins.jwt-auth]`` and ``[[plugins.jwt-auth.issuers]]``.

Key material named in the config (a secret in an environment variable, PEM and JWKS
files) is read when the config is loaded, so that a missing file or variable is a
config error naming its path, and a changed file makes a reload build a new filter
instance (a salted fingerprint of the material is part of the config's repr and
equality; the material itself is in neither).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import ssl
from dataclasses import dataclass, field
from typing import Literal

from engine.schema import ByteSize, Duration, Invalid
from plugins._fetch import check_url
from plugins._identity import (
    check_header_name,
    check_header_pattern,
    check_injected_header_name,
)

from .keys import (
    ASYMMETRIC_ALGORITHMS,
    HMAC_ALGORITHMS,
    HMAC_MIN_BYTES,
    SUPPORTED_ALGORITHMS,
    JwksError,
    KeySet,
    VerifyKey,
    algorithms_for_public_key,
    load_pem,
    log,
    weakness,
)

__all__ = ["IssuerConfig", "JwtAuthConfig"]

_PROCESS_SALT = secrets.token_bytes(32)


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class IssuerConfig:
    """One trusted token issuer: its ``iss``, keys, algorithms and claim rules."""

    algorithms: list[str] = field(
        metadata=_doc("algorithms accepted from this issuer, e.g. [\"RS256\"]; never 'none'")
    )
    issuer: str | None = field(
        default=None,
        metadata=_doc("the exact iss claim; omit only when this is the one issuer (iss unchecked)"),
    )
    secret: str | None = field(
        default=None, repr=False, metadata=_doc("HMAC secret inline (prefer secret_env)")
    )
    secret_env: str | None = field(
        default=None, metadata=_doc("name of the environment variable holding the HMAC secret")
    )
    public_keys: list[str] = field(
        default_factory=list, repr=False, metadata=_doc("PEM public keys or certificates, inline")
    )
    public_key_files: list[str] = field(
        default_factory=list, metadata=_doc("paths of PEM public key or certificate files")
    )
    jwks_file: str | None = field(default=None, metadata=_doc("path of a JWKS document"))
    jwks_url: str | None = field(default=None, metadata=_doc("http(s) URL of the JWKS"))
    jwks_ca_file: str | None = field(
        default=None,
        metadata=_doc("PEM CA bundle to verify an https jwks_url (default: the system's)"),
    )
    # An hour is a common IdP Cache-Control for JWKS; rotations also show up sooner
    # through the unknown-kid refetch.
    jwks_ttl: Duration = field(
        default=Duration(3600.0), metadata=_doc("refresh period of jwks_url")
    )
    # Bounds how often unknown-kid tokens (or an outage) can make us call the IdP.
    jwks_cooldown: Duration = field(
        default=Duration(30.0),
        metadata=_doc("minimum time between fetches on unknown kid, and retry period on error"),
    )
    jwks_timeout: Duration = field(
        default=Duration(5.0), metadata=_doc("deadline of one JWKS fetch")
    )
    # Real key sets are a few KiB; the cap bounds memory if the URL serves something else.
    jwks_max_size: ByteSize = field(
        default=ByteSize(256 * 1024), metadata=_doc("largest JWKS document accepted")
    )
    audience: str | list[str] | None = field(
        default=None,
        metadata=_doc("accepted aud values (any one must match); unset: aud not checked"),
    )
    required_claims: list[str] = field(
        default_factory=list, metadata=_doc("claims that must be present")
    )
    require_exp: bool = field(default=True, metadata=_doc("refuse tokens without exp"))
    # 30 s covers NTP-disciplined clocks with a wide margin while keeping an expired
    # token's afterlife short (Envoy's jwt_authn default is 60 s, pyjwt's 0).
    leeway: Duration = field(
        default=Duration(30.0), metadata=_doc("clock skew allowed on exp, nbf, iat")
    )
    max_age: Duration | None = field(
        default=None, metadata=_doc("refuse tokens whose iat is older than this")
    )
    consumer_claim: str = field(
        default="sub", metadata=_doc("claim naming the consumer (required in tokens)")
    )
    consumer_prefix: str = field(
        default="",
        metadata=_doc("put before the consumer claim's value: keeps issuers' consumers apart"),
    )
    # RFC 8725 §3.11: a token made for another purpose (a DPoP proof, a logout token)
    # signed by the same key must not pass for an access token.
    token_types: list[str] = field(
        default_factory=lambda: ["JWT", "at+jwt"],
        metadata=_doc("accepted typ header values ([]: any); a token without typ is accepted"),
    )
    roles_claims: list[str] = field(
        default_factory=lambda: ["roles", "groups"],
        metadata=_doc("claims (dotted paths allowed) holding roles/groups"),
    )
    # Derived at load, not TOML keys: the keys themselves, and a fingerprint of the key
    # material. The engine reuses a filter instance across reloads when the config's
    # repr is unchanged, so a rotated secret or key file must change the repr; the
    # fingerprint is keyed with a per-process salt, so printing it reveals nothing.
    static_keys: KeySet = field(init=False, repr=False, compare=False, default=KeySet())
    key_fingerprint: str = field(init=False, repr=True, compare=True, default="")

    def __post_init__(self) -> None:
        if not self.algorithms:
            raise Invalid("algorithms", "name at least one algorithm")
        for i, alg in enumerate(self.algorithms):
            if alg.lower() == "none":
                raise Invalid(f"algorithms[{i}]", 'unsigned tokens ("none") are never accepted')
            if alg not in SUPPORTED_ALGORITHMS:
                raise Invalid(
                    f"algorithms[{i}]",
                    f"unknown algorithm {alg!r} (known: {', '.join(SUPPORTED_ALGORITHMS)})",
                )
        hmac_algs = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        asym_algs = [a for a in self.algorithms if a in ASYMMETRIC_ALGORITHMS]
        if hmac_algs and asym_algs:
            # RFC 8725 §2.1: one key interpreted by both kinds is the confusion attack.
            raise Invalid(
                "algorithms",
                "do not mix HMAC (HS*) and public-key algorithms in one issuer (RFC 8725 "
                "2.1: one key read both ways is the confusion attack); list one kind",
            )
        if self.issuer is not None and not self.issuer:
            raise Invalid("issuer", "must not be empty (omit it to leave iss unchecked)")
        has_secret = self.secret is not None or self.secret_env is not None
        has_public = bool(
            self.public_keys or self.public_key_files or self.jwks_file or self.jwks_url
        )
        if not has_secret and not has_public:
            raise Invalid(
                None,
                "no keys: set secret_env (or secret) for HS* algorithms, or public_keys, "
                "public_key_files, jwks_file or jwks_url",
            )
        if self.secret is not None and self.secret_env is not None:
            raise Invalid("secret", "set secret or secret_env, not both")
        if has_secret and has_public:
            raise Invalid(None, "an issuer has either an HMAC secret or public keys, not both")
        if has_secret and not hmac_algs:
            raise Invalid("algorithms", "an HMAC secret needs HS256, HS384 or HS512")
        if has_public and not asym_algs:
            raise Invalid("algorithms", "public keys need RS*, PS*, ES* or EdDSA algorithms")
        for key in ("jwks_ttl", "jwks_cooldown", "jwks_timeout"):
            if getattr(self, key) <= 0:
                raise Invalid(key, "must be more than 0")
        if self.jwks_url is not None:
            problem = check_url(self.jwks_url)
            if problem:
                raise Invalid("jwks_url", problem)
        if self.jwks_ca_file is not None:
            if self.jwks_url is None:
                raise Invalid("jwks_ca_file", "only used with jwks_url")
            try:
                self.tls_context()
            except (OSError, ssl.SSLError) as e:
                raise Invalid("jwks_ca_file", f"cannot load {self.jwks_ca_file!r}: {e}") from None
        if not self.consumer_claim:
            raise Invalid("consumer_claim", "must not be empty")
        for i, typ in enumerate(self.token_types):
            if not media_type(typ) or any(c.isspace() for c in typ):
                raise Invalid(f"token_types[{i}]", "must be a media type such as at+jwt")
        keys, material = self._load_keys(hmac_algs, asym_algs)
        if self.jwks_ca_file is not None:  # a CA bundle replaced on disk is a new config too
            material.append(_read(self.jwks_ca_file, "jwks_ca_file"))
        object.__setattr__(self, "static_keys", KeySet.build(keys, self.algorithms))
        digest = hmac.new(_PROCESS_SALT, digestmod=hashlib.sha256)
        for item in material:
            digest.update(len(item).to_bytes(8, "big") + item)
        object.__setattr__(self, "key_fingerprint", digest.hexdigest()[:16])

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``jwks_url``: ``None`` means the system's CA store."""
        if self.jwks_ca_file is None:
            return None
        return ssl.create_default_context(cafile=self.jwks_ca_file)

    def _load_keys(
        self, hmac_algs: list[str], asym_algs: list[str]
    ) -> tuple[list[VerifyKey], list[bytes]]:
        keys: list[VerifyKey] = []
        material: list[bytes] = []
        if self.secret is not None or self.secret_env is not None:
            where = "secret" if self.secret is not None else "secret_env"
            if self.secret is not None:
                raw = self.secret
            else:
                assert self.secret_env is not None
                env = os.environ.get(self.secret_env)
                if not env:
                    raise Invalid(where, f"environment variable {self.secret_env} is not set")
                raw = env
            secret = raw.encode("utf-8")
            for alg in hmac_algs:
                if len(secret) < HMAC_MIN_BYTES[alg]:
                    raise Invalid(
                        where,
                        f"{alg} needs a secret of at least {HMAC_MIN_BYTES[alg]} bytes "
                        f"(RFC 7518 §3.2), this one has {len(secret)}",
                    )
                keys.append(VerifyKey(alg, None, secret))
            material.append(secret)
        # (config path, what to call the key in an error, PEM text)
        pems: list[tuple[str, str, bytes]] = [
            (f"public_keys[{i}]", "this key", pem.encode())
            for i, pem in enumerate(self.public_keys)
        ]
        for i, path in enumerate(self.public_key_files):
            where = f"public_key_files[{i}]"
            pems.append((where, repr(path), _read(path, where)))
        for where, name, data in pems:
            try:
                public = load_pem(data)
            except ValueError as e:
                raise Invalid(where, str(e)) from None
            if problem := weakness(public):
                raise Invalid(where, f"{name} is {problem}")
            usable = [a for a in algorithms_for_public_key(public) if a in asym_algs]
            if not usable:
                raise Invalid(
                    where,
                    f"this key cannot verify any of {', '.join(asym_algs)} "
                    f"(it verifies {', '.join(algorithms_for_public_key(public)) or 'nothing'})",
                )
            keys.extend(VerifyKey(a, None, public) for a in usable)
            material.append(data)
        if self.jwks_file is not None:
            data = _read(self.jwks_file, "jwks_file")
            try:
                keyset = KeySet.from_jwks_bytes(data, asym_algs)
            except JwksError as e:
                raise Invalid("jwks_file", str(e)) from None
            # Skipped like a JWKS URL's: a file copied from an IdP may keep a legacy key.
            if keyset.too_weak:
                log.warning("jwks_file %s: ignoring %s", self.jwks_file, "; ".join(keyset.too_weak))
            keys.extend(k for ks in keyset.by_alg.values() for k in ks)
            material.append(data)
        return keys, material


def media_type(typ: str) -> str:
    """A ``typ`` value as compared: lowercase, without the ``application/`` prefix that
    RFC 7515 §4.1.9 lets it leave out."""
    typ = typ.lower()
    return typ[len("application/") :] if typ.startswith("application/") else typ


def _read(path: str, where: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise Invalid(where, f"cannot read {path!r}: {e.strerror or e}") from None


@dataclass(frozen=True)
class JwtAuthConfig:
    """``[plugins.jwt-auth]``: where the token is, who may issue it, what it must grant."""

    issuers: list[IssuerConfig] = field(
        metadata=_doc("trusted issuers ([[plugins.jwt-auth.issuers]] tables)")
    )
    header: str = field(
        default="Authorization", metadata=_doc('header carrying the token ("" for none)')
    )
    scheme: str = field(
        default="Bearer", metadata=_doc('auth scheme before the token in header ("" for none)')
    )
    cookie: str | None = field(
        default=None, metadata=_doc("cookie carrying the token, tried after the header")
    )
    # Real access tokens are 1-2 KiB; 8 KiB bounds the decoding work of garbage.
    max_token_size: ByteSize = field(
        default=ByteSize(8 * 1024), metadata=_doc("longer tokens are refused")
    )
    # Verifying a signature costs ~100 us; a client sends the same token many times.
    cache_size: int = field(
        default=10_000,
        metadata=_doc("verified tokens remembered until they expire (0: verify every time)"),
    )
    allow_anonymous: bool = field(
        default=False,
        metadata=_doc("no token: continue with no identity (an invalid token is still 401)"),
    )
    # Either credential is enough (Envoy's requires_any): an earlier auth filter on the
    # route with allow_anonymous, then this one. Off, both are required.
    skip_if_authenticated: bool = field(
        default=False,
        metadata=_doc("a caller an earlier auth filter identified passes without a token"),
    )
    required_scopes: list[str] = field(default_factory=list, metadata=_doc("scopes needed"))
    scope_match: Literal["any", "all"] = field(
        default="all", metadata=_doc('"all" required scopes, or "any" one of them')
    )
    required_roles: list[str] = field(default_factory=list, metadata=_doc("roles needed"))
    role_match: Literal["any", "all"] = field(
        default="all", metadata=_doc('"all" required roles, or "any" one of them')
    )
    claims_to_headers: dict[str, str] = field(
        default_factory=lambda: {"sub": "X-User-Id"},
        metadata=_doc("verified claims copied to request headers: { claim = header }"),
    )
    strip_headers: list[str] = field(
        default_factory=list,
        metadata=_doc('headers removed from requests besides the default list ("X-Foo-*" ok)'),
    )
    hide_credentials: bool = field(
        default=False, metadata=_doc("remove the token from the request sent upstream")
    )
    realm: str = field(default="filtergate", metadata=_doc("realm of the WWW-Authenticate"))

    def __post_init__(self) -> None:
        if not self.issuers:
            raise Invalid("issuers", "name at least one issuer")
        seen: dict[str | None, int] = {}
        for i, iss in enumerate(self.issuers):
            if iss.issuer in seen:
                raise Invalid(
                    f"issuers[{i}].issuer",
                    f"issuer {iss.issuer!r} is already declared by issuers[{seen[iss.issuer]}]",
                )
            seen[iss.issuer] = i
        if None in seen and len(self.issuers) > 1:
            raise Invalid(
                f"issuers[{seen[None]}].issuer",
                "required when there are several issuers (tokens are matched by iss)",
            )
        self._check_consumer_prefixes()
        if not self.header and not self.cookie:
            raise Invalid("header", "set a header or a cookie to read the token from")
        if self.header and (problem := check_header_name(self.header)):
            raise Invalid("header", problem)
        if self.cookie is not None and (not self.cookie or ";" in self.cookie):
            raise Invalid("cookie", "not a valid cookie name")
        if " " in self.scheme:
            raise Invalid("scheme", "a scheme is a single word such as Bearer")
        if self.cache_size < 0:
            raise Invalid("cache_size", "must not be negative")
        if self.max_token_size < 16:
            raise Invalid("max_token_size", "too small for any token")
        for claim, name in self.claims_to_headers.items():
            if problem := check_injected_header_name(name):
                raise Invalid(f"claims_to_headers.{claim}", problem)
        for i, pattern in enumerate(self.strip_headers):
            if problem := check_header_pattern(pattern):
                raise Invalid(f"strip_headers[{i}]", problem)

    def _check_consumer_prefixes(self) -> None:
        """Once an issuer has a ``consumer_prefix``, every issuer needs one and none may
        start another: then no two issuers' consumers can meet (with ``""`` and
        ``"partner:"``, the first issuer's ``sub`` ``"partner:alice"`` would be the
        second's ``"alice"``)."""
        prefixes = [i.consumer_prefix for i in self.issuers]
        if not any(prefixes):
            return
        for i, prefix in enumerate(prefixes):
            if not prefix:
                raise Invalid(
                    f"issuers[{i}].consumer_prefix",
                    "set one on every issuer once any issuer has one, or their consumers can meet",
                )
            for j, other in enumerate(prefixes):
                if j != i and other.startswith(prefix):
                    raise Invalid(
                        f"issuers[{j}].consumer_prefix",
                        f"{other!r} starts with issuers[{i}]'s {prefix!r}: their consumers "
                        "can meet",
                    )
