"""rate-limit: sliding-window limits per consumer, in memory or shared through Redis.

Runs in the LIMIT stage, after authentication, so a limit applies to the verified
caller (``exchange.identity``) and a refused request never reaches the upstream. A
refusal raises :class:`~engine.errors.RateLimited` (429 with ``Retry-After`` and the
gateway's JSON body). Every response on a limited route, the 429 included, carries
``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset`` and
``RateLimit-Policy`` (IETF draft "RateLimit header fields for HTTP"), and optionally the
``X-RateLimit-*`` forms.

The user guide is the README's rate-limit section; the algorithms and the sliding-window
counter's error bound are in :mod:`plugins.rate_limit.algorithms`.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import trio

from engine import metrics
from engine.chain import Filter, FilterContext, Stage
from engine.config import check_tls_files, client_tls_context
from engine.errors import RateLimited, ServiceUnavailable
from engine.exchange import Exchange, Response, StashKey
from engine.plugins import hookimpl
from engine.schema import Duration, Invalid
from plugins._identity import fingerprint
from plugins.rate_limit.algorithms import Quota
from plugins.rate_limit.memory import MemoryStore
from plugins.rate_limit.redis import (
    AnyPool,
    RedisCluster,
    RedisError,
    RedisPool,
    RedisStore,
    Sentinels,
    parse_redis_url,
    parse_sentinel_node,
    shared_pool,
)
from plugins.rate_limit.store import Outcome, Policy, Store, StoreUnavailable

__all__ = [
    "GroupConfig",
    "LimitConfig",
    "RateLimit",
    "RateLimitConfig",
    "RateLimitUnavailable",
    "RedisConfig",
    "filtergate_filters",
]

Algorithm = Literal["sliding-window", "sliding-log", "token-bucket"]


@dataclass(frozen=True)
class LimitConfig:
    """One quota: ``limit`` requests per ``window``."""

    limit: int = field(metadata={"doc": "requests admitted per window (at least 1)"})
    window: Duration = field(metadata={"doc": 'the window, e.g. "1s", "1m", "1h"'})
    burst: int | None = field(
        default=None,
        metadata={"doc": "token-bucket only: the bucket size (default: limit)"},
    )

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise Invalid("limit", f"expected at least 1, got {self.limit}")
        if self.window <= 0:
            raise Invalid("window", "expected a duration longer than 0")
        if self.burst is not None and self.burst < 1:
            raise Invalid("burst", f"expected at least 1, got {self.burst}")

    def quota(self) -> Quota:
        return Quota(self.limit, float(self.window), self.burst)


@dataclass(frozen=True)
class GroupConfig:
    """The limits of a tier: callers whose identity is in this consumer group."""

    limits: tuple[LimitConfig, ...] = field(
        metadata={"doc": "the group's quotas; they replace the route's `limits`"}
    )

    def __post_init__(self) -> None:
        if not self.limits:
            raise Invalid("limits", "expected at least one limit")


@dataclass(frozen=True)
class RedisConfig:
    """Where the shared counters live (``store = "redis"``)."""

    # Redis' own default port; database 0 as redis-cli assumes.
    url: str = field(
        default="redis://127.0.0.1:6379/0",
        metadata={"doc": "redis://[[user]:password@]host[:port][/db]; rediss:// for TLS"},
    )
    ca_file: str | None = field(
        default=None,
        metadata={"doc": "rediss://: PEM CA bundle to verify the server (default: the system's)"},
    )
    cert_file: str | None = field(
        default=None,
        metadata={"doc": "rediss://: PEM client certificate, for a server that asks for one"},
    )
    key_file: str | None = field(
        default=None,
        metadata={"doc": "rediss://: PEM private key of cert_file (if not in cert_file)"},
    )
    password: str | None = field(
        default=None, metadata={"doc": "overrides a password given in the URL"}
    )
    # A local Redis answers in well under a millisecond; 100 ms is a slow network
    # round trip, and the most a request waits before the failure policy applies.
    timeout: Duration = field(
        default=Duration(0.1),
        metadata={"doc": "the most one decision waits for Redis (connecting included)"},
    )
    # One connection serves thousands of decisions per second; a few hide latency.
    pool_size: int = field(default=8, metadata={"doc": "connections per gateway process"})
    # After a failure, do not make every request pay a timeout to find Redis still down.
    retry_interval: Duration = field(
        default=Duration(1.0),
        metadata={"doc": "after a failure, decide by `failure` without asking Redis this long"},
    )
    key_prefix: str = field(
        default="filtergate:rl:", metadata={"doc": "prefix of every key this plugin writes"}
    )
    cluster: bool = field(
        default=False,
        metadata={
            "doc": "the url is one node of a Redis Cluster (or its configuration endpoint); "
            "the others are found from it"
        },
    )
    sentinel_master: str | None = field(
        default=None,
        metadata={"doc": "Redis Sentinel: the master's name (the url's host and port unused)"},
    )
    sentinel_nodes: tuple[str, ...] = field(
        default=(), metadata={"doc": 'with sentinel_master: the sentinels, ["host:port", ...]'}
    )
    sentinel_username: str | None = field(
        default=None, metadata={"doc": "with sentinel_master: the sentinels' ACL user"}
    )
    sentinel_password: str | None = field(
        default=None, metadata={"doc": "with sentinel_master: the sentinels' password"}
    )
    # Derived at load, not a TOML key (check_tls_files): the engine keeps a filter
    # instance across reloads while its config compares equal, so a CA or certificate
    # replaced on disk must make the config differ.
    tls_fingerprint: str = field(init=False, repr=True, compare=True, default="")

    def __post_init__(self) -> None:
        sentinel = self.sentinel_master is not None
        try:
            address = parse_redis_url(self.url, self.password, host_required=not sentinel)
        except ValueError as e:
            raise Invalid("url", str(e)) from None
        self._check_sentinels(address.tls)
        if self.cluster:
            if sentinel:
                raise Invalid("cluster", "a Redis Cluster has no sentinels: set one or the other")
            if address.db:
                raise Invalid("url", "a Redis Cluster has only database 0")
        files = {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file}
        given = {k: v for k, v in files.items() if v is not None}
        if given and not address.tls:
            raise Invalid(next(iter(given)), "only used with a rediss:// url")
        if self.key_file is not None and self.cert_file is None:
            raise Invalid("key_file", "set cert_file too (the key is cert_file's)")
        if given:
            key = "ca_file" if self.cert_file is None else "cert_file"
            fingerprint = check_tls_files(files, self.tls_context, key)
            object.__setattr__(self, "tls_fingerprint", fingerprint)
        if self.pool_size < 1:
            raise Invalid("pool_size", f"expected at least 1, got {self.pool_size}")
        if self.timeout <= 0:
            raise Invalid("timeout", "expected a duration longer than 0")

    def _check_sentinels(self, tls: bool) -> None:
        if self.sentinel_master is None:
            for key in ("sentinel_nodes", "sentinel_username", "sentinel_password"):
                if getattr(self, key):
                    raise Invalid(key, "only used with sentinel_master")
            return
        if not self.sentinel_master.strip():
            raise Invalid("sentinel_master", "expected the master's name, got an empty string")
        if not self.sentinel_nodes:
            raise Invalid("sentinel_nodes", 'give the sentinels, e.g. ["10.0.0.1:26379"]')
        for i, node in enumerate(self.sentinel_nodes):
            try:
                parse_sentinel_node(node)
            except ValueError as e:
                raise Invalid(f"sentinel_nodes[{i}]", str(e)) from None
        if self.sentinel_username is not None and self.sentinel_password is None:
            raise Invalid("sentinel_username", "set sentinel_password too (AUTH needs both)")
        if tls:
            raise Invalid("sentinel_master", "not supported with a rediss:// url")

    def pool_key(self) -> tuple[object, ...]:
        """What makes the connection pool: every instance with the same shares one
        (``key_prefix`` and ``retry_interval`` are the store's own)."""
        return (
            self.url,
            self.password,
            self.tls_fingerprint,
            self.ca_file,
            self.cert_file,
            self.key_file,
            float(self.timeout),
            self.pool_size,
            self.cluster,
            self.sentinel_master,
            self.sentinel_nodes,
            self.sentinel_username,
            self.sentinel_password,
        )

    def sentinels(self) -> Sentinels | None:
        """The sentinels to ask where the master is, or None: ``url`` is the server."""
        if self.sentinel_master is None:
            return None
        return Sentinels(
            self.sentinel_master,
            tuple(parse_sentinel_node(n) for n in self.sentinel_nodes),
            self.sentinel_username,
            self.sentinel_password,
        )

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for a ``rediss://`` url: ``None`` means the system's CAs and
        no client certificate."""
        if self.ca_file is None and self.cert_file is None:
            return None
        return client_tls_context(self.ca_file, self.cert_file, self.key_file)


def _redis_pool(r: RedisConfig) -> AnyPool:
    address = parse_redis_url(r.url, r.password, host_required=r.sentinel_master is None)
    if r.cluster:
        return RedisCluster(
            address, timeout=float(r.timeout), pool_size=r.pool_size, ssl_context=r.tls_context()
        )
    return RedisPool(
        address,
        timeout=float(r.timeout),
        pool_size=r.pool_size,
        ssl_context=r.tls_context(),
        sentinels=r.sentinels(),
    )


_KEY_HELP = 'expected "consumer", "ip", "route", "header:NAME" or "claim:NAME"'


def _check_key_part(part: str) -> bool:
    if part in ("consumer", "ip", "route"):
        return True
    kind, sep, name = part.partition(":")
    return bool(sep) and kind in ("header", "claim") and bool(name.strip())


@dataclass(frozen=True)
class RateLimitConfig:
    """``[plugins.rate-limit]`` / ``[routes.plugins.rate-limit]``."""

    limits: tuple[LimitConfig, ...] = field(
        metadata={"doc": 'quotas, all enforced: [{ limit = 10, window = "1s" }, ...]'}
    )
    algorithm: Algorithm = field(
        default="sliding-window",
        metadata={"doc": '"sliding-window" (approximate), "sliding-log" (exact), "token-bucket"'},
    )
    key: str | tuple[str, ...] = field(
        default=("consumer",),
        metadata={"doc": "who is counted: consumer, ip, route, header:NAME, claim:NAME"},
    )
    groups: dict[str, GroupConfig] = field(
        default_factory=dict,
        metadata={"doc": "limits per consumer group (tiers); the first matching group wins"},
    )
    store: Literal["memory", "redis"] = field(
        default="memory", metadata={"doc": '"memory" (this process) or "redis" (shared)'}
    )
    redis: RedisConfig = field(default_factory=RedisConfig, metadata={"doc": "store = redis"})
    failure: Literal["fail_open", "fail_closed"] = field(
        default="fail_open",
        metadata={"doc": "when Redis cannot decide: admit (fail_open) or answer 503"},
    )
    headers: bool = field(default=True, metadata={"doc": "send the RateLimit-* headers"})
    legacy_headers: bool = field(
        default=False, metadata={"doc": "also send X-RateLimit-Limit/-Remaining/-Reset"}
    )
    # 100k keys of the sliding-window counter (two quotas) take about 37 MB.
    max_keys: int = field(
        default=100_000, metadata={"doc": "memory store: the most keys kept (LRU beyond)"}
    )
    # One IPv6 host has a whole /64 to pick addresses from (RFC 8981 rotates them even
    # for benign clients): counted per address, a client would escape its limit.
    ipv6_prefix: int = field(
        default=64, metadata={"doc": "IPv6 clients are counted per network of this length"}
    )

    def __post_init__(self) -> None:
        if not self.limits:
            raise Invalid("limits", "expected at least one limit")
        parts = self.key_parts
        if not parts:
            raise Invalid("key", "expected at least one key part")
        for i, part in enumerate(parts):
            if not _check_key_part(part):
                where = "key" if isinstance(self.key, str) else f"key[{i}]"
                raise Invalid(where, f"{_KEY_HELP}, got {part!r}")
        if self.algorithm != "token-bucket":
            bursts = [(f"limits[{i}]", lim) for i, lim in enumerate(self.limits)]
            for name, group in self.groups.items():
                bursts += [
                    (f"groups.{name}.limits[{i}]", lim) for i, lim in enumerate(group.limits)
                ]
            for where, lim in bursts:
                if lim.burst is not None:
                    raise Invalid(f"{where}.burst", 'applies only to algorithm = "token-bucket"')
        if self.max_keys < 1:
            raise Invalid("max_keys", f"expected at least 1, got {self.max_keys}")
        if not 1 <= self.ipv6_prefix <= 128:
            raise Invalid("ipv6_prefix", f"expected 1 to 128, got {self.ipv6_prefix}")

    @property
    def key_parts(self) -> tuple[str, ...]:
        return (self.key,) if isinstance(self.key, str) else tuple(self.key)


class RateLimitUnavailable(ServiceUnavailable):
    """``failure = "fail_closed"`` and the store could not decide: 503."""

    code = "rate_limit_unavailable"


# --- keys ---------------------------------------------------------------------------------

KeyPart = Callable[[Exchange], str]


def _escape(value: str) -> str:
    # "|" separates key parts; escape it (and the escape character) in caller-chosen values.
    if "|" in value or "%" in value:
        return value.replace("%", "%25").replace("|", "%7C")
    return value


def client_network(address: str, ipv6_prefix: int) -> str:
    """The client ``address`` as counted: an IPv4 address as it is, an IPv6 one as its
    network of ``ipv6_prefix`` bits in canonical form (``2001:db8:1:2::/64``; at 128 the
    address itself, canonical). An IPv6 address that carries an IPv4 client's address
    (IPv4-mapped ``::ffff:a.b.c.d``, or NAT64's well-known ``64:ff9b::/96`` as SIIT data
    centres show IPv4 clients) is that IPv4 address, so such clients are not lumped into
    one network. Anything else (not an address) is left as it is."""
    if ":" not in address:
        return address
    try:
        packed = socket.inet_pton(socket.AF_INET6, address.partition("%")[0])
    except OSError:
        return address
    if packed[:12] in _EMBEDS_IPV4:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    if ipv6_prefix == 128:
        return socket.inet_ntop(socket.AF_INET6, packed)
    shift = 128 - ipv6_prefix
    network = (int.from_bytes(packed, "big") >> shift << shift).to_bytes(16, "big")
    return f"{socket.inet_ntop(socket.AF_INET6, network)}/{ipv6_prefix}"


# The first 96 bits of IPv6 addresses whose last 32 are an IPv4 client's address:
# IPv4-mapped (RFC 4291 2.5.5.2) and NAT64's well-known prefix (RFC 6052 2.1).
_EMBEDS_IPV4 = frozenset({bytes(10) + b"\xff\xff", b"\x00\x64\xff\x9b" + bytes(8)})


def _consumer(ipv6_prefix: int) -> KeyPart:
    def part(ex: Exchange) -> str:
        # Anonymous traffic is counted per client address, so a coarse per-IP limit
        # applies.
        identity = ex.identity
        if identity is None:
            return "ip:" + client_network(ex.request.client, ipv6_prefix)
        return "c:" + _escape(identity.consumer)

    return part


def _ip(ipv6_prefix: int) -> KeyPart:
    def part(ex: Exchange) -> str:
        return client_network(ex.request.client, ipv6_prefix)

    return part


def _route(ex: Exchange) -> str:
    return _escape(ex.route.name) if ex.route is not None else ""


def _header(name: str) -> KeyPart:
    raw = name.lower().encode("latin-1")

    def part(ex: Exchange) -> str:
        value = ex.request.headers.get(raw)
        return "" if value is None else _escape(value.decode("latin-1"))

    return part


def _claim(name: str) -> KeyPart:
    def part(ex: Exchange) -> str:
        identity = ex.identity
        value = identity.claims.get(name) if identity is not None else None
        if value is None:
            return ""
        if isinstance(value, str):
            return _escape(value)
        return _escape(json.dumps(value, sort_keys=True, separators=(",", ":")))

    return part


def compile_key(parts: Sequence[str], ipv6_prefix: int = 64) -> Callable[[Exchange], str]:
    """A function giving the counting key of an exchange for the configured ``parts``.

    Missing headers and claims count as the empty value (so all such callers share one
    counter); very long keys are replaced by their SHA-256 to bound memory. IPv6
    clients are counted per network of ``ipv6_prefix`` bits (:func:`client_network`).
    """
    fns: list[KeyPart] = []
    for p in parts:
        if p == "consumer":
            fns.append(_consumer(ipv6_prefix))
        elif p == "ip":
            fns.append(_ip(ipv6_prefix))
        elif p == "route":
            fns.append(_route)
        elif p.startswith("header:"):
            fns.append(_header(p.partition(":")[2].strip()))
        else:
            fns.append(_claim(p.partition(":")[2].strip()))

    if len(fns) > 1:

        def key(ex: Exchange) -> str:
            k = "|".join(f(ex) for f in fns)
            return k if len(k) <= _MAX_KEY else _digest(k)

        return key
    part = fns[0]

    def single_key(ex: Exchange) -> str:
        k = part(ex)
        return k if len(k) <= _MAX_KEY else _digest(k)

    return single_key


def _digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


_MAX_KEY = 200  # characters; a header may be kilobytes long


# --- the filter ---------------------------------------------------------------------------


# What on_request learnt, for on_response's headers: the caller's policy and the
# decision (None when the store could not decide). A plain tuple: one per request.
_STAMP: StashKey[tuple[Policy, Outcome | None]] = StashKey("rate-limit")

_OUR_HEADERS = frozenset(
    {
        b"ratelimit-limit",
        b"ratelimit-remaining",
        b"ratelimit-reset",
        b"ratelimit-policy",
        b"x-ratelimit-limit",
        b"x-ratelimit-remaining",
        b"x-ratelimit-reset",
    }
)

# Refusals only: admitted requests are the route's requests minus these, and counting
# them too would cost every request a metric update.
_limited = metrics.counter(
    "filtergate_rate_limit_limited_total",
    "Requests refused with 429 by the rate limiter, by route.",
    ("route",),
)
_store_failures = metrics.counter(
    "filtergate_rate_limit_store_failures_total",
    "Decisions the rate-limit store could not make, by store and the policy applied.",
    ("store", "policy"),
)


class RateLimit(Filter):
    """Counts requests per key and refuses those over a quota with 429."""

    name = "rate-limit"
    stage = Stage.LIMIT
    Config = RateLimitConfig

    def __init__(self, config: RateLimitConfig, context: FilterContext) -> None:
        super().__init__(config, context)
        self.config: RateLimitConfig = config
        self.log = context.logger
        self._key = compile_key(config.key_parts, config.ipv6_prefix)
        self._scope = _escape(context.scope)
        self._default = Policy.build("", config.algorithm, [lim.quota() for lim in config.limits])
        self._groups = [
            (
                name,
                Policy.build("g:" + _escape(name), config.algorithm, [q.quota() for q in g.limits]),
            )
            for name, g in config.groups.items()
        ]
        # Each tier's counting keys start "SCOPE|POLICY|": made once, not per request.
        self._prefixes = {
            policy.name: f"{self._scope}|{policy.name}|"
            for policy in [self._default, *(p for _, p in self._groups)]
        }
        self._legacy = config.legacy_headers
        self.store: Store
        self._memory: MemoryStore | None = None  # set when decisions are synchronous
        if config.store == "redis":
            r = config.redis
            pool = shared_pool(r.pool_key(), partial(_redis_pool, r))
            self.store = RedisStore(
                pool, prefix=r.key_prefix, retry_interval=float(r.retry_interval)
            )
        else:
            self.store = self._memory = MemoryStore(config.max_keys)
            # The memory store decides synchronously, so the request phase is a plain
            # call: no coroutine made and awaited per request.
            vars(self)["on_request"] = self._on_request_memory
        if not config.headers:
            # Nothing to add to responses: no response phase at all.
            vars(self)["on_response"] = None

    def policy_for(self, exchange: Exchange) -> Policy:
        """The tier of the caller: its first configured group, else the default limits."""
        identity = exchange.identity
        if identity is not None and identity.groups and self._groups:
            for name, policy in self._groups:
                if name in identity.groups:
                    return policy
        return self._default

    async def on_request(self, exchange: Exchange) -> None:
        """Count the request; raises RateLimited (429) when a quota is spent.

        Raises :class:`RateLimitUnavailable` (503) when the store cannot decide and
        ``failure = "fail_closed"``. (With the memory store, the instance's
        ``on_request`` is :meth:`_on_request_memory`, the same without a coroutine.)
        """
        policy = self.policy_for(exchange)
        key = self._prefixes[policy.name] + self._key(exchange)
        try:
            outcome = await self.store.decide(key, policy, trio.current_time())
        except StoreUnavailable as e:
            self._store_failed(exchange, key, e)
            exchange.stash[_STAMP] = (policy, None)
            if self.config.failure == "fail_closed":
                raise RateLimitUnavailable(
                    "rate limiting is unavailable",
                    retry_after=float(self.config.redis.retry_interval),
                ) from e
            return
        self._count(exchange, policy, outcome)

    def _on_request_memory(self, exchange: Exchange) -> None:
        assert self._memory is not None
        policy = self.policy_for(exchange) if self._groups else self._default
        key = self._prefixes[policy.name] + self._key(exchange)
        outcome = self._memory.decide_now(key, policy, trio.current_time())
        # _count, inlined: one call fewer per request.
        exchange.stash[_STAMP] = (policy, outcome)
        if not outcome.allowed:
            self._refuse(exchange, outcome)

    def _count(self, exchange: Exchange, policy: Policy, outcome: Outcome) -> None:
        """Stamp the decision for the response side; raise RateLimited when refused."""
        exchange.stash[_STAMP] = (policy, outcome)
        if not outcome.allowed:
            self._refuse(exchange, outcome)

    def _refuse(self, exchange: Exchange, outcome: Outcome) -> None:
        _limited.inc(route=exchange.route.name if exchange.route is not None else "")
        q = outcome.quota
        raise RateLimited(
            outcome.retry_after,
            f"rate limit exceeded: {q.limit} requests per {q.window:g}s",
        )

    def _store_failed(self, exchange: Exchange, key: str, error: Exception) -> None:
        policy = self.config.failure
        route = exchange.route.name if exchange.route is not None else ""
        _store_failures.inc(store=self.config.store, policy=policy)
        # The store logs the outage once; per request this is debug, and the key (which
        # may hold a header such as an API key) only as a fingerprint.
        self.log.debug(
            "rate-limit store unavailable (%s): %s request %s on route %r, key %s",
            error,
            "admitting" if policy == "fail_open" else "refusing",
            exchange.request_id,
            route,
            fingerprint(key),
        )

    def on_response(self, exchange: Exchange, response: Response) -> None:
        """Add the RateLimit-* headers (also to this filter's own 429)."""
        stamp = exchange.stash.get(_STAMP)
        if stamp is None:
            return
        policy, outcome = stamp
        headers = response.headers
        items = headers.items
        for name, _ in items:  # remove_where's scan inlined: an upstream rarely sends one
            if name in _OUR_HEADERS:
                headers.remove_where(_OUR_HEADERS.__contains__)
                items = headers.items
                break
        if outcome is None:
            items.append((b"ratelimit-policy", policy.header))
            return
        # Integers written out by the bytes formatting itself: no str, no encode call.
        limit = b"%d" % outcome.quota.limit
        remaining = b"%d" % outcome.remaining
        reset = b"%d" % math.ceil(outcome.reset)
        # One extend, not an append per field.
        items.extend(
            (
                (b"ratelimit-policy", policy.header),
                (b"ratelimit-limit", limit),
                (b"ratelimit-remaining", remaining),
                (b"ratelimit-reset", reset),
            )
        )
        if self._legacy:
            items.extend(
                (
                    (b"x-ratelimit-limit", limit),
                    (b"x-ratelimit-remaining", remaining),
                    (b"x-ratelimit-reset", reset),
                )
            )

    async def setup(self) -> None:
        """With Redis, check it answers; a failure is logged, never fatal (see ``failure``)."""
        if isinstance(self.store, RedisStore):
            try:
                await self.store.ping()
            except RedisError as e:
                self.log.warning(
                    "Redis for rate limits is not answering at start-up (%s); "
                    "decisions follow failure = %r until it does",
                    e,
                    self.config.failure,
                )

    async def background(self) -> None:
        """Hold the store open while this instance is in use (with Redis Sentinel,
        following the master); close it when dropped."""
        if isinstance(self.store, RedisStore):
            await self.store.pool.serve()  # shared: the last user closes its connections
            return
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self.store.aclose()


@hookimpl
def filtergate_filters() -> list[type[Any]]:
    return [RateLimit]
