"""The ``key-auth`` filter: API keys mapped to consumers, stored hashed.

The config holds the SHA-256 of each key (``filtergate hash-key`` prints one for a new
key), never the key. Per request (stage AUTHENTICATE): strip client-supplied identity
headers; read the key from the header (default ``X-API-Key``) or the query parameter;
hash it and look the hash up; refuse a missing or unknown key with 401; set
``exchange.identity`` and inject ``X-Consumer-Id`` / ``X-Consumer-Groups``.

Constant time: the presented key is hashed before anything is compared, and the
lookup is by that hash. Timing can at most reveal something about the SHA-256 of a
guess, which says nothing usable about a stored key (finding a key from its hash is a
preimage attack); the final equality check is :func:`hmac.compare_digest` anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

from engine.chain import Filter, FilterContext, Stage
from engine.errors import BadRequest, GatewayError, Unauthorized
from engine.exchange import Exchange, Identity
from engine.metrics import counter
from engine.plugins import hookimpl
from engine.schema import Invalid
from plugins._identity import (
    DEFAULT_IDENTITY_HEADERS,
    HeaderPatterns,
    admit_anonymous,
    challenge,
    challenges,
    check_header_name,
    check_header_pattern,
    check_injected_header_name,
    fingerprint,
    header_key,
    header_value,
    inject_headers,
    strip_identity_headers,
)

__all__ = [
    "ConsumerConfig",
    "KeyAuth",
    "KeyAuthConfig",
    "filtergate_filters",
    "hash_key",
    "new_key",
]

_FAILURES = counter(
    "filtergate_auth_failures_total",
    "Requests refused by an authentication filter, by plugin and reason",
    ("plugin", "reason"),
)

# Far above any generated key; bounds the work spent hashing garbage.
MAX_KEY_LENGTH = 1024

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_CONSUMER_ID = re.compile(r"^[A-Za-z0-9._@:+-]{1,128}$")


def hash_key(key: str) -> str:
    """The value to store as ``key_sha256`` for ``key``: its SHA-256, lowercase hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random API key: 32 bytes from :mod:`secrets`, URL-safe base64 (43 chars)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ConsumerConfig:
    """One consumer: ``{ id = "alice", key_sha256 = "<hex>", groups = ["gold"] }``."""

    id: str = field(metadata={"doc": "the consumer id, as injected and seen by the rate limiter"})
    key_sha256: str | list[str] = field(
        metadata={"doc": "SHA-256 (hex) of the consumer's key, or a list of them (rotation)"}
    )
    groups: list[str] = field(default_factory=list, metadata={"doc": "the consumer's groups"})

    def __post_init__(self) -> None:
        if not _CONSUMER_ID.match(self.id):
            raise Invalid("id", "1-128 characters among letters, digits and ._@:+-")
        hashes = [self.key_sha256] if isinstance(self.key_sha256, str) else self.key_sha256
        if not hashes:
            raise Invalid("key_sha256", "name at least one key hash")
        for i, h in enumerate(hashes):
            where = "key_sha256" if isinstance(self.key_sha256, str) else f"key_sha256[{i}]"
            if not _HEX64.match(h):
                raise Invalid(
                    where,
                    "expected 64 hex digits, the SHA-256 of the key "
                    "(`filtergate hash-key` prints it)",
                )
        for i, g in enumerate(self.groups):
            if not g or header_value(g) is None or "," in g:
                raise Invalid(f"groups[{i}]", f"not a valid group name: {g!r}")

    @property
    def hashes(self) -> list[str]:
        """Every accepted key hash, lowercase."""
        raw = [self.key_sha256] if isinstance(self.key_sha256, str) else self.key_sha256
        return [h.lower() for h in raw]


@dataclass(frozen=True)
class KeyAuthConfig:
    """``[plugins.key-auth]``: where the key is, and who holds which key."""

    consumers: list[ConsumerConfig] = field(
        default_factory=list, metadata={"doc": "the consumers and their key hashes"}
    )
    header: str = field(
        default="X-API-Key", metadata={"doc": 'header carrying the key ("" for none)'}
    )
    query_param: str | None = field(
        default=None, metadata={"doc": "query parameter carrying the key, tried after the header"}
    )
    allow_anonymous: bool = field(
        default=False,
        metadata={"doc": "no key: continue with no identity (an unknown key is still 401)"},
    )
    # Either credential is enough (Envoy's requires_any): an earlier auth filter on the
    # route with allow_anonymous, then this one. Off, both are required.
    skip_if_authenticated: bool = field(
        default=False,
        metadata={"doc": "a caller an earlier auth filter identified passes without a key"},
    )
    consumer_header: str = field(
        default="X-Consumer-Id", metadata={"doc": 'header given the consumer id ("" for none)'}
    )
    groups_header: str = field(
        default="X-Consumer-Groups",
        metadata={"doc": 'header given the groups, comma-separated ("" for none)'},
    )
    strip_headers: list[str] = field(
        default_factory=list,
        metadata={"doc": 'headers removed from requests besides the default list ("X-Foo-*" ok)'},
    )
    hide_credentials: bool = field(
        default=False, metadata={"doc": "remove the key from the request sent upstream"}
    )
    realm: str = field(default="filtergate", metadata={"doc": "realm of the WWW-Authenticate"})

    def __post_init__(self) -> None:
        if not self.header and not self.query_param:
            raise Invalid("header", "set a header or a query_param to read the key from")
        if self.header and (problem := check_header_name(self.header)):
            raise Invalid("header", problem)
        if self.query_param is not None and not self.query_param:
            raise Invalid("query_param", "must not be empty (omit it to read no parameter)")
        for key in ("consumer_header", "groups_header"):
            value = getattr(self, key)
            if value and (problem := check_injected_header_name(value)):
                raise Invalid(key, problem)
        for i, pattern in enumerate(self.strip_headers):
            if problem := check_header_pattern(pattern):
                raise Invalid(f"strip_headers[{i}]", problem)
        ids: dict[str, int] = {}
        owners: dict[str, int] = {}
        for i, consumer in enumerate(self.consumers):
            if consumer.id in ids:
                raise Invalid(
                    f"consumers[{i}].id",
                    f"consumer {consumer.id!r} is already declared by "
                    f"consumers[{ids[consumer.id]}]",
                )
            ids[consumer.id] = i
            for h in consumer.hashes:
                if h in owners:
                    raise Invalid(
                        f"consumers[{i}].key_sha256",
                        f"the same key is already given to consumers[{owners[h]}]",
                    )
                owners[h] = i


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    identity: Identity
    headers: tuple[tuple[bytes, bytes], ...]  # (lowercase name, value), to inject


class KeyAuth(Filter):
    """Authenticates API keys; see the module docstring for the contract."""

    name = "key-auth"
    stage = Stage.AUTHENTICATE
    Config = KeyAuthConfig

    def __init__(self, config: KeyAuthConfig, context: FilterContext) -> None:
        super().__init__(config, context)
        self.config: KeyAuthConfig = config
        self.log = context.logger
        self.by_digest: dict[bytes, _Entry] = {}
        for c in config.consumers:
            identity = Identity(consumer=c.id, groups=tuple(c.groups), source=self.name)
            headers: list[tuple[bytes, bytes]] = []
            if config.consumer_header:
                headers.append((header_key(config.consumer_header), c.id.encode()))
            if config.groups_header and c.groups:
                headers.append((header_key(config.groups_header), ",".join(c.groups).encode()))
            for h in c.hashes:
                digest = bytes.fromhex(h)
                self.by_digest[digest] = _Entry(digest, identity, tuple(headers))
        injected = [h for h in (config.consumer_header, config.groups_header) if h]
        self.strip = HeaderPatterns([*DEFAULT_IDENTITY_HEADERS, *config.strip_headers, *injected])
        # Also stripped on open routes to the same upstream (the engine's hygiene).
        self.identity_headers = self.strip
        self._header = config.header.lower().encode() if config.header else None
        # Read here, so never stripped as an identity header on this filter's routes.
        self.credential_headers = frozenset({self._header}) if self._header else frozenset()
        # The challenge of a request without credentials (RFC 6750 3.1: no error=).
        self._challenge = challenge("Key", config.realm)

    def on_request(self, exchange: Exchange) -> None:
        strip_identity_headers(exchange, self.strip, self.credential_headers)
        if exchange.identity is not None and self.config.skip_if_authenticated:
            # Identified already (either credential is enough): a key sent too is not
            # checked, so it is not forwarded either (the upstream may trust it); but in
            # Authorization a value with a scheme ("Bearer ...") is another plugin's.
            value = self._header == b"authorization" and exchange.request.headers.get(
                b"authorization"
            )
            if value and b" " in value.strip():
                self._remove_query_key(exchange)
            else:
                self.remove_credentials(exchange)
            return
        try:
            self._authenticate(exchange)
        except GatewayError:
            # Refused: nothing is forwarded, and the access log (which writes the target
            # as forwarded) must not carry the key, valid or not.
            self.remove_credentials(exchange)
            raise
        if self.config.hide_credentials:
            self.remove_credentials(exchange)

    def _authenticate(self, exchange: Exchange) -> None:
        key = self.read_key(exchange)
        if key is None:
            if self.config.allow_anonymous:
                admit_anonymous(exchange, self._challenge)
                return
            _FAILURES.inc(plugin=self.name, reason="missing")
            raise Unauthorized(
                "an API key is required",
                headers=challenges(exchange, self._challenge),
            )
        entry = self.lookup(key)
        if entry is None:
            _FAILURES.inc(plugin=self.name, reason="unknown_key")
            self.log.debug(
                "refused unknown API key %s on route %s",
                fingerprint(key),
                exchange.route.name if exchange.route is not None else "-",
            )
            raise Unauthorized(
                "invalid API key",
                headers=[challenge("Key", self.config.realm, "invalid_key", "unknown API key")],
            )
        exchange.identity = entry.identity
        inject_headers(exchange, entry.headers)

    def lookup(self, key: str) -> _Entry | None:
        """The consumer entry for ``key``, or ``None``; see the module docstring on timing."""
        if len(key) > MAX_KEY_LENGTH:
            return None
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        entry = self.by_digest.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            return None
        return entry

    def read_key(self, exchange: Exchange) -> str | None:
        """The key from the header, else the query parameter; ``None`` when absent.

        Raises ``BadRequest`` when the key is given more than once (ambiguous).
        """
        request = exchange.request
        if self._header is not None:
            values = request.headers.get_all(self._header)
            if len(values) > 1:
                self._ambiguous(f"more than one {self.config.header} header")
            if values and values[0].strip():
                return values[0].strip().decode("latin-1")
        if self.config.query_param is not None:
            found = request.query.get(self.config.query_param, [])
            if len(found) > 1:
                self._ambiguous(f"more than one {self.config.query_param} parameter")
            if found and found[0]:
                return found[0]
        return None

    def _ambiguous(self, description: str) -> None:
        _FAILURES.inc(plugin=self.name, reason="ambiguous")
        raise BadRequest(description, close=False)

    def remove_credentials(self, exchange: Exchange) -> None:
        if self._header is not None:
            exchange.request.headers.remove(self._header)
        self._remove_query_key(exchange)

    def _remove_query_key(self, exchange: Exchange) -> None:
        request = exchange.request
        param = self.config.query_param
        if param is not None and request.raw_query:
            kept = [
                part
                for part in request.raw_query.split(b"&")
                if unquote_plus(part.partition(b"=")[0].decode("latin-1")) != param
            ]
            request.raw_query = b"&".join(kept)
            request._query = None  # re-parse on next use


@hookimpl
def filtergate_filters() -> list[type[Filter]]:
    return [KeyAuth]
