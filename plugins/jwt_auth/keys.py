"""Verification keys: HMAC secrets, PEM public keys, JSON Web Key Sets, and a JWKS URL.

A :class:`KeySet` maps each allowed algorithm to the keys that may verify it, so that a
key is only ever used with the algorithms of its own type: an RSA public key can never
end up as an HMAC secret (the classic key-confusion attack), whatever the token says.
:class:`JwksSource` keeps the key set of a JWKS URL fresh: fetched at start-up,
refreshed on a TTL, refetched on an unknown ``kid`` at most once per cooldown, and the
last good set kept when the identity provider is down.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from engine.metrics import counter
from plugins._fetch import FetchError, FetchResult, fetch

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "SUPPORTED_ALGORITHMS",
    "JwksError",
    "JwksSource",
    "KeySet",
    "VerifyKey",
    "algorithms_for_jwk",
    "algorithms_for_public_key",
    "load_pem",
    "weakness",
]

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
ASYMMETRIC_ALGORITHMS = (*RSA_ALGORITHMS, *EC_ALGORITHMS, "EdDSA")
SUPPORTED_ALGORITHMS = (*HMAC_ALGORITHMS, *ASYMMETRIC_ALGORITHMS)

HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
"""RFC 7518 §3.2: an HMAC key MUST be at least as long as the hash output."""

RSA_MIN_BITS = 2048
"""RFC 7518 §3.3 (and §3.5 for PS*): an RSA key MUST have 2048 bits or more."""

_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

_FETCHES = counter(
    "filtergate_jwks_fetches_total",
    "JWKS fetches by the jwt-auth plugin, by result (ok, error)",
    ("result",),
)

log = logging.getLogger("filtergate.plugins.jwt-auth")


class JwksError(ValueError):
    """A document is not a usable JSON Web Key Set; the message says why."""


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One key bound to one algorithm. ``key`` is what ``jwt.decode`` takes for it."""

    alg: str
    kid: str | None
    key: Any  # bytes (HMAC), a cryptography public key (PEM), or a jwt.PyJWK (JWKS)


def algorithms_for_public_key(key: object) -> tuple[str, ...]:
    """The algorithms a cryptography public key object can verify (empty if none)."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = _CURVE_NAMES.get(key.curve.name)
        return tuple(a for a, c in EC_ALGORITHMS.items() if c == crv)
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    return ()


def weakness(key: object) -> str | None:
    """Why a cryptography public key is too weak to verify tokens with; ``None`` if it
    is not. pyjwt only warns about such a key, so every key is checked here, on load.

    EC keys need no check: :func:`algorithms_for_public_key` and
    :func:`algorithms_for_jwk` bind each curve to its one algorithm.
    """
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < RSA_MIN_BITS:
        return (
            f"an RSA key of {key.key_size} bits, and RS*/PS* need at least "
            f"{RSA_MIN_BITS} (RFC 7518 §3.3)"
        )
    return None


def algorithms_for_jwk(jwk: Mapping[str, Any]) -> tuple[str, ...]:
    """The asymmetric algorithms a JWK may verify, honouring its ``alg``, ``use``, ``key_ops``.

    Symmetric (``oct``) keys yield nothing: a published key set is public, so an HMAC
    secret in it would let anyone sign tokens.
    """
    use = jwk.get("use")
    if use is not None and use != "sig":
        return ()
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return ()
    kty, crv = jwk.get("kty"), jwk.get("crv")
    algs: tuple[str, ...]
    if kty == "RSA":
        algs = RSA_ALGORITHMS
    elif kty == "EC":
        algs = tuple(a for a, c in EC_ALGORITHMS.items() if c == crv)
    elif kty == "OKP" and crv in ("Ed25519", "Ed448"):
        algs = ("EdDSA",)
    else:
        return ()
    alg = jwk.get("alg")
    if alg is not None:
        return (alg,) if alg in algs else ()
    return algs


def load_pem(data: bytes) -> Any:
    """A public key object from PEM text: a public key or an X.509 certificate.

    Raises ``ValueError`` with a message for the user (never echoing the data).
    """
    if b"PRIVATE KEY" in data:
        raise ValueError("this is a private key: give the gateway only the public key")
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            return x509.load_pem_x509_certificate(data).public_key()
        except Exception:
            raise ValueError("not a readable PEM certificate") from None
    try:
        return load_pem_public_key(data)
    except Exception:
        raise ValueError("not a PEM public key or certificate") from None


@dataclass(frozen=True)
class KeySet:
    """Keys by algorithm. Immutable: a refresh builds a new one and swaps it in."""

    by_alg: Mapping[str, tuple[VerifyKey, ...]] = field(default_factory=dict)
    # Keys of a JWKS document left out as too weak (see :func:`weakness`), one line
    # each, for a warning; a set built otherwise has none.
    too_weak: tuple[str, ...] = ()

    @classmethod
    def build(cls, keys: Iterable[VerifyKey], allowed: Iterable[str]) -> KeySet:
        """Only keys whose algorithm is in ``allowed`` are kept."""
        allow = set(allowed)
        by_alg: dict[str, list[VerifyKey]] = {}
        for k in keys:
            if k.alg in allow:
                by_alg.setdefault(k.alg, []).append(k)
        return cls({a: tuple(ks) for a, ks in by_alg.items()})

    @classmethod
    def from_jwks(cls, document: object, allowed: Iterable[str]) -> KeySet:
        """The usable keys of a JWKS document (already parsed JSON).

        Raises :class:`JwksError` when the document is not a key set or holds no key
        usable with the ``allowed`` algorithms; single unusable keys are skipped, and
        those skipped as too weak are listed in ``too_weak``.
        """
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise JwksError('not a JSON Web Key Set: expected an object with a "keys" array')
        allow = tuple(allowed)
        out: list[VerifyKey] = []
        too_weak: list[str] = []
        for jwk in document["keys"]:
            if not isinstance(jwk, dict):
                continue
            kid = jwk.get("kid")
            if kid is not None and not isinstance(kid, str):
                continue
            for alg in algorithms_for_jwk(jwk):
                if alg not in allow:
                    continue
                try:
                    key = jwt.PyJWK(jwk, alg)
                except Exception:  # a malformed key: skip it, keep the others
                    continue
                problem = weakness(key.key)
                if problem is not None:  # the same for all its algorithms: say it once
                    too_weak.append(f"key {kid!r}: {problem}" if kid else f"a key: {problem}")
                    break
                out.append(VerifyKey(alg, kid, key))
        if not out:
            left_out = f" (left out: {'; '.join(too_weak)})" if too_weak else ""
            raise JwksError(f"no key in the set can verify {', '.join(allow)}{left_out}")
        return cls(cls.build(out, allow).by_alg, tuple(too_weak))

    @classmethod
    def from_jwks_bytes(cls, data: bytes, allowed: Iterable[str]) -> KeySet:
        """Like :meth:`from_jwks` from the raw document; raises :class:`JwksError`."""
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            raise JwksError("not valid JSON") from None
        return cls.from_jwks(document, allowed)

    def union(self, other: KeySet) -> KeySet:
        merged = {a: list(ks) for a, ks in self.by_alg.items()}
        for a, ks in other.by_alg.items():
            merged.setdefault(a, []).extend(ks)
        return KeySet({a: tuple(ks) for a, ks in merged.items()})

    def candidates(self, alg: str, kid: str | None) -> tuple[VerifyKey, ...]:
        """Keys to try for a token with ``alg`` and ``kid``.

        With a ``kid``, the keys with that id plus keys that have none (PEM keys and
        secrets); without one, every key of the algorithm.
        """
        keys = self.by_alg.get(alg, ())
        if kid is None:
            return keys
        return tuple(k for k in keys if k.kid is None or k.kid == kid)

    def knows_kid(self, kid: str) -> bool:
        return any(k.kid == kid for ks in self.by_alg.values() for k in ks)

    def __len__(self) -> int:
        return sum(len(ks) for ks in self.by_alg.values())


Fetcher = Callable[[str], Awaitable[FetchResult]]


class JwksSource:
    """The key set published at a JWKS URL, kept fresh.

    ``keys`` is ``None`` until a fetch succeeded once; afterwards it is the last good
    set, which a failed refresh never replaces. Times are ``trio.current_time()``.
    """

    def __init__(
        self,
        url: str,
        algorithms: Iterable[str],
        *,
        ttl: float,
        cooldown: float,
        timeout: float,
        max_bytes: int,
        ssl_context: ssl.SSLContext | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.url = url
        self.algorithms = tuple(algorithms)
        self.ttl = ttl
        self.cooldown = cooldown
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.ssl_context = ssl_context
        self.log = logger or log
        self.keys: KeySet | None = None
        self.last_attempt: float | None = None
        self.last_ok: bool = False
        self.last_error: str | None = None
        self.attempts = 0
        self._inflight: trio.Event | None = None
        self._warned_too_weak: tuple[str, ...] = ()

    def may_refetch(self, now: float) -> bool:
        """Whether an unknown ``kid`` may trigger a fetch now (or join one in flight)."""
        if self._inflight is not None:
            return True
        return self.last_attempt is None or now - self.last_attempt >= self.cooldown

    def retry_after(self, now: float) -> float:
        """Seconds until :meth:`may_refetch` becomes true."""
        if self.last_attempt is None:
            return 0.0
        return max(0.0, self.cooldown - (now - self.last_attempt))

    def next_refresh_in(self, now: float) -> float:
        """Seconds until the background refresh is due: the TTL after a success, the
        cooldown after a failure, now if never tried."""
        if self.last_attempt is None:
            return 0.0
        period = self.ttl if self.last_ok else min(self.cooldown, self.ttl)
        return max(0.0, period - (now - self.last_attempt))

    async def refresh(self) -> bool:
        """Fetch the key set now (or wait for the fetch already in flight).

        Returns whether a key set is loaded afterwards. Never raises but ``Cancelled``;
        a cancelled fetch does not count against the cooldown.
        """
        if self._inflight is not None:
            await self._inflight.wait()
            return self.keys is not None
        done = self._inflight = trio.Event()
        previous_attempt = self.last_attempt
        self.last_attempt = trio.current_time()
        finished = False
        try:
            self.attempts += 1
            try:
                result = await fetch(
                    self.url,
                    time_limit=self.timeout,
                    max_bytes=self.max_bytes,
                    ssl_context=self.ssl_context,
                )
                if result.status != 200:
                    raise JwksError(f"HTTP status {result.status}")
                keys = KeySet.from_jwks_bytes(result.body, self.algorithms)
            except (FetchError, JwksError) as e:
                self._failed(str(e))
            except Exception as e:  # whatever the provider sends, the gateway keeps serving
                self._failed(f"{type(e).__name__}: {e}")
            else:
                self.keys = keys
                self.last_ok = True
                self.last_error = None
                _FETCHES.inc(result="ok")
                self.log.info("loaded %d keys from JWKS %s", len(keys), self.url)
                # Once per key set: a refresh that serves the same set says nothing new.
                if keys.too_weak and keys.too_weak != self._warned_too_weak:
                    self.log.warning("JWKS %s: ignoring %s", self.url, "; ".join(keys.too_weak))
                self._warned_too_weak = keys.too_weak
            finished = True
        finally:
            if not finished:
                self.last_attempt = previous_attempt
            self._inflight = None
            done.set()
        return self.keys is not None

    def _failed(self, reason: str) -> None:
        self.last_ok = False
        self.last_error = reason
        _FETCHES.inc(result="error")
        keeping = "keeping the last good key set" if self.keys else "no key set loaded yet"
        self.log.warning("JWKS fetch from %s failed (%s); %s", self.url, reason, keeping)

    async def serve_refresh(self) -> None:
        """Refresh on schedule forever (run in the filter's ``background``)."""
        while True:
            await trio.sleep(self.next_refresh_in(trio.current_time()))
            await self.refresh()
