"""The ``cache`` filter: a shared HTTP cache (RFC 9111) between the gateway and the upstream.

It wraps every upstream call of its route (``around_upstream``, outside ``retry`` and
``circuit-breaker`` when listed before them), so a hit costs the upstream nothing, is
served while a breaker is open, and still passes through every filter's request and
response side (authentication, limits, transformation, compression) as a miss does.

What is stored: the answer to a ``GET`` without a body, when

- its status is one of ``statuses``;
- the upstream allows it: no ``no-store`` or ``private``, no ``Set-Cookie``, no
  ``Vary: *``, and a body framed by ``Content-Length`` or chunked (a close-delimited body
  cut midway would pass for whole);
- it says how long it is fresh (``s-maxage``, ``max-age``, ``Expires``), or ``ttl`` is set
  (then ``ttl`` is its freshness); ``no-cache`` stores it for revalidation only;
- a request carrying ``Authorization`` got ``public``, ``s-maxage`` or ``must-revalidate``
  (RFC 9111 3.5);
- it is not a breaker's fallback (which must not outlive the outage);
- its body is at most ``max_entry_size``. A body of known length is read whole from the
  upstream first, at the upstream's pace, stored, then sent; a chunked body is kept as
  it streams to the client and stored once it has ended whole.

What is served: a stored answer for the same route, upstream and target (path and query
as forwarded), the same host and scheme the client asked for, the same consumer
(``per_consumer``: an authenticated request only meets the answers fetched for its own
consumer, by the identity's source and consumer), the same values of ``key_headers`` and
of the request fields the answer's ``Vary`` names. ``HEAD`` is served from the ``GET``'s
answer.
A fresh answer is a hit; a stale one with a validator (``ETag``, ``Last-Modified``) is
revalidated with a conditional request, and a ``304`` for it refreshes it (one that
sets a cookie reaches its client, and the answer is no longer kept). A client's own
``If-None-Match`` / ``If-Modified-Since`` is answered from the cache (a ``304`` when it
matches); on the way to the upstream the client's conditionals are replaced by the
cache's, so that the cache gets whole answers. A request with ``Range``, ``If-Range``,
``If-Match`` or ``If-Unmodified-Since`` bypasses the cache, and so does one with a
``Cookie`` unless ``cookies`` is set (Varnish's default: many upstreams shape an answer
by the session and mark it cacheable for browsers, without ``private``).

Within ``stale_while_revalidate`` (or the upstream's own ``stale-while-revalidate``) past
its freshness, a stale answer is served at once, and the first request to find it so
starts one refresh of it in the background (``background`` holds the nursery), bounded
by ``lock_timeout`` or the route's timeout; a failed refresh leaves it as it is.

Served answers carry ``Age`` and, unless ``status_header`` is empty, ``X-Cache-Status``:
``HIT``, ``MISS``, ``EXPIRED`` (stale, fetched again), ``REVALIDATED``, ``STALE`` (served
stale because the upstream failed), ``UPDATING`` (served stale while it is refreshed) or
``BYPASS``.

Concurrent misses of one key wait for the first (``lock_timeout``) until its answer's
head has come, or its body too when it is stored whole first, so a popular entry that
expires sends one request upstream, not one per client. A non-error answer to an
unsafe method (``POST``, ``PUT``, ``PATCH``, ``DELETE`` ...) drops what is stored for its
target (RFC 9111 4.4). A request's own ``Cache-Control`` is not obeyed, as nginx does not:
a client cannot make the gateway go to the upstream.

Memory: at most ``max_size`` bytes of stored answers per filter instance and process,
least recently used dropped first, and at most ``max_size`` more in the bodies being
fetched to be stored (past that, an answer passes unstored). Each worker process has
its own cache.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import trio

from engine.chain import CallNext, Filter, FilterContext, Stage
from engine.errors import GatewayError
from engine.exchange import (
    END,
    FRAMING_HEADERS,
    HOP_BY_HOP,
    BodyStream,
    Exchange,
    Headers,
    Response,
    UpstreamCall,
    checked_field,
)
from engine.metrics import counter
from engine.plugins import hookimpl
from engine.schema import ByteSize, Duration, Invalid
from plugins.circuit_breaker import is_fallback

__all__ = ["Cache", "CacheConfig", "MemoryCache", "directives", "freshness"]

_GET = b"GET"
_HEAD = b"HEAD"
#: Methods that leave what is stored as it is (RFC 9111 4.4 names the unsafe ones).
_SAFE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
#: Request fields a stored whole answer cannot stand in for: the request goes upstream.
_BYPASS = frozenset({b"range", b"if-range", b"if-match", b"if-unmodified-since"})
#: The client's conditionals: answered from the cache, replaced by its own upstream.
_CONDITIONALS = frozenset({b"if-none-match", b"if-modified-since"})
#: Fields never stored: the connection's, the framing (the gateway frames what it
#: sends), ``Age`` (worked out when served).
_NOT_STORED = HOP_BY_HOP | {b"content-length", b"age"}
#: What a 304 carries of the answer it stands for (RFC 9110 15.4.5).
_NOT_MODIFIED_FIELDS = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary"}
)
#: Request fields always in the key: the host and scheme the client asked for (an
#: upstream writes them into links and redirects; unkeyed, one host's answer would be
#: served to another's clients: web cache poisoning).
_KEYED = (b"host", b"x-forwarded-host", b"x-forwarded-proto")
#: Upstream statuses a stale answer may stand in for (RFC 5861 stale-if-error).
_FAILED = frozenset({500, 502, 503, 504})
_MAX_AGE = 2**31  # delta-seconds beyond this are taken as this (RFC 9111 1.2.2)
#: Answers kept per key, one per combination of the values its Vary names.
_MAX_VARIANTS = 8
#: Targets whose last invalidation, and purges, remembered for the answers being
#: fetched; past this, the oldest are forgotten and every answer then being fetched
#: counts as changed.
_MAX_CHANGED = 4096
#: Chunks already received that are read past to let a dropped answer's connection go
#: back to the pool (an error page is one or two).
_DRAIN_CHUNKS = 16
#: Fields the status field may not be named: the framing, and those the cache reads or
#: writes itself.
_NOT_STATUS_NAMES = frozenset(FRAMING_HEADERS) | {
    "age",
    "cache-control",
    "content-encoding",
    "content-location",
    "content-type",
    "date",
    "etag",
    "expires",
    "last-modified",
    "set-cookie",
    "vary",
}

_responses = counter(
    "filtergate_cache_responses_total",
    "Cacheable requests by what the cache did (hit, miss, expired, revalidated, stale, bypass).",
    ("route", "status"),
)
_background_updates = counter(
    "filtergate_cache_background_refreshes_total",
    "Stale answers brought up to date in the background (stale-while-revalidate), "
    "by outcome (refreshed, dropped, failed).",
    ("route", "outcome"),
)
_evictions = counter(
    "filtergate_cache_evictions_total",
    "Stored answers dropped to make room (least recently used first).",
)


@dataclass(frozen=True)
class CacheConfig:
    ttl: Duration = field(
        default=Duration(0.0),
        metadata={
            "doc": "freshness of an answer that gives none (no s-maxage, max-age or Expires); "
            "0: such answers are not stored"
        },
    )
    statuses: list[int] = field(
        default_factory=lambda: [200, 203, 204, 300, 301, 308, 404, 410],
        metadata={"doc": "statuses that may be stored"},
    )
    max_size: ByteSize = field(
        default=ByteSize(32 * 1024 * 1024),
        metadata={"doc": "memory for stored answers, per process (least recently used dropped)"},
    )
    max_entry_size: ByteSize = field(
        default=ByteSize(1024 * 1024),
        metadata={"doc": "larger answers are passed on, not stored"},
    )
    per_consumer: bool = field(
        default=True,
        metadata={"doc": "an authenticated request only meets answers fetched for its consumer"},
    )
    cookies: bool = field(
        default=False,
        metadata={
            "doc": "whether requests with a Cookie use the cache (by default they bypass it: "
            "an upstream may shape its answer by a session without saying private)"
        },
    )
    key_headers: list[str] = field(
        default_factory=list,
        metadata={"doc": "request fields whose values are part of the key (beside Vary's)"},
    )
    stale_if_error: Duration = field(
        default=Duration(0.0),
        metadata={
            "doc": "how long past its freshness a stored answer may stand in for a failed "
            "upstream (error, timeout, open breaker, 500/502/503/504)"
        },
    )
    stale_while_revalidate: Duration = field(
        default=Duration(0.0),
        metadata={
            "doc": "how long past its freshness a stored answer is served at once while one "
            "request brings it up to date in the background"
        },
    )
    lock_timeout: Duration = field(
        default=Duration(5.0),
        metadata={"doc": "how long a miss waits for a concurrent one of the same key; 0: never"},
    )
    status_header: str = field(
        default="x-cache-status",
        metadata={"doc": 'the field that says HIT, MISS ... on answers; "" for none'},
    )

    def __post_init__(self) -> None:
        for i, status in enumerate(self.statuses):
            if not 200 <= status <= 599:
                raise Invalid(f"statuses[{i}]", f"must be a final status (200-599), got {status}")
        if self.max_entry_size > self.max_size:
            raise Invalid("max_entry_size", "must not be larger than max_size")
        for i, name in enumerate(self.key_headers):
            try:
                checked_field(name, "")
            except ValueError:
                raise Invalid(f"key_headers[{i}]", f"not a header name: {name!r}") from None
        if self.status_header:
            try:
                name = checked_field(self.status_header, "")[0].decode()
            except ValueError:
                raise Invalid(
                    "status_header", f"not a header name: {self.status_header!r}"
                ) from None
            if name in _NOT_STATUS_NAMES:
                raise Invalid("status_header", f"{name!r} is a field of HTTP's own")
        for name in ("ttl", "stale_if_error", "stale_while_revalidate", "lock_timeout"):
            if getattr(self, name) < 0:
                raise Invalid(name, "must not be negative")


# -- what the fields say --------------------------------------------------------------


def directives(items: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """The ``Cache-Control`` directives of ``items`` (all its fields), names lowercased,
    values unquoted (``b""`` for none); the first of a repeated directive counts."""
    out: dict[bytes, bytes] = {}
    for name, value in items:
        if name == b"cache-control":
            for part in value.split(b","):
                key, _, arg = part.partition(b"=")
                key = key.strip().lower()
                if key and key not in out:
                    out[key] = arg.strip().strip(b'"')
    return out


def _seconds(value: bytes) -> int | None:
    """delta-seconds, or None when it is not one."""
    return min(int(value), _MAX_AGE) if value.isdigit() else None


def _first(items: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in items:
        if n == name:
            return v
    return None


def _http_date(value: bytes | None) -> float | None:
    """An HTTP date as a POSIX timestamp, or None when it is not one."""
    if value is None:
        return None
    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (ValueError, TypeError, IndexError, OverflowError):
        return None


def freshness(cc: dict[bytes, bytes], items: list[tuple[bytes, bytes]], ttl: float) -> float | None:
    """How long an answer is fresh (RFC 9111 4.2.1), ``ttl`` when it says nothing, or
    None when it says nothing and ``ttl`` is 0. An unreadable value means stale (0)."""
    if b"s-maxage" in cc:
        return float(_seconds(cc[b"s-maxage"]) or 0)
    if b"max-age" in cc:
        return float(_seconds(cc[b"max-age"]) or 0)
    expires = _first(items, b"expires")
    if expires is not None:
        at = _http_date(expires)
        if at is None:
            return 0.0  # "0", "-1" ...: already expired (RFC 9111 5.3)
        date = _http_date(_first(items, b"date"))
        if date is None:
            date = time.time()  # when it was received (RFC 9111 4.2.1): a wall-clock read
        return max(0.0, at - date)
    return ttl if ttl > 0 else None


def _age(items: Iterable[tuple[bytes, bytes]]) -> float:
    """What an answer's ``Age`` says it had spent in caches behind us (0 when unreadable)."""
    value = _first(items, b"age")
    return float(_seconds(value.strip()) or 0) if value is not None else 0.0


def _vary(items: Iterable[tuple[bytes, bytes]]) -> tuple[bytes, ...] | None:
    """The request fields an answer varies on, sorted; None for ``Vary: *``."""
    names: set[bytes] = set()
    for n, v in items:
        if n == b"vary":
            for name in v.split(b","):
                name = name.strip().lower()
                if name == b"*":
                    return None
                if name:
                    names.add(name)
    return tuple(sorted(names))


def _values(names: tuple[bytes, ...], headers: Headers) -> tuple[bytes | None, ...]:
    """The request's values of ``names`` (repeated fields joined), None where absent."""
    if not names:
        return ()
    out: list[bytes | None] = []
    items = headers.items
    for name in names:
        found = [v for n, v in items if n == name]
        out.append(b",".join(found) if found else None)
    return tuple(out)


def _tags(value: bytes) -> list[bytes]:
    """The entity tags of an If-None-Match value, weak prefixes dropped (weak comparison)."""
    out = []
    for tag in value.split(b","):
        tag = tag.strip()
        out.append(tag[2:] if tag.startswith(b"W/") else tag)
    return out


# -- the store ------------------------------------------------------------------------


class Entry:
    """One stored answer."""

    __slots__ = (
        "age0",
        "body",
        "etag",
        "headers",
        "last_modified",
        "lifetime",
        "reason",
        "size",
        "stale_window",
        "status",
        "stored_at",
        "update_window",
        "vary",
        "vary_values",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        stored_at: float,
        lifetime: float,
        windows: tuple[float, float],
        vary: tuple[bytes, ...],
        vary_values: tuple[bytes | None, ...],
        age: float = 0.0,
    ) -> None:
        self.status = status
        self.reason = reason
        self.body = body
        self.vary = vary
        self.vary_values = vary_values
        self.headers: list[tuple[bytes, bytes]] = []
        self.stored_at = stored_at
        self.age0 = 0.0
        self.lifetime = lifetime
        self.stale_window = 0.0
        self.update_window = 0.0
        self.etag: bytes | None = None
        self.last_modified: bytes | None = None
        self.size = 0
        self.set_headers(headers, stored_at, lifetime, windows, age)

    def set_headers(
        self,
        headers: list[tuple[bytes, bytes]],
        now: float,
        lifetime: float,
        windows: tuple[float, float],
        age: float = 0.0,
    ) -> None:
        """New fields (``Age`` is not among them: ``age`` is what it said), fetched or
        validated at ``now``; ``windows``: how long past ``lifetime`` it may stand in
        for a failure, and be served while it is brought up to date."""
        self.headers = headers
        self.stored_at = now
        self.age0 = age
        self.lifetime = lifetime
        self.stale_window, self.update_window = windows
        self.etag = _first(headers, b"etag")
        self.last_modified = _first(headers, b"last-modified")
        self.size = 256 + len(self.body) + sum(len(n) + len(v) + 32 for n, v in headers)

    def age(self, now: float) -> float:
        return self.age0 + (now - self.stored_at)

    def fresh(self, now: float) -> bool:
        return self.age(now) < self.lifetime

    def may_stand_in(self, now: float) -> bool:
        """Whether it may be served stale for a failed upstream (stale-if-error)."""
        return self.age(now) < self.lifetime + self.stale_window

    def may_serve_updating(self, now: float) -> bool:
        """Whether it may be served stale while it is refreshed (stale-while-revalidate)."""
        return self.age(now) < self.lifetime + self.update_window

    def conditionals(self) -> list[tuple[bytes, bytes]]:
        """The fields of a conditional request that revalidates it."""
        out = []
        if self.etag is not None:
            out.append((b"if-none-match", self.etag))
        if self.last_modified is not None:
            out.append((b"if-modified-since", self.last_modified))
        return out

    @property
    def validated(self) -> bool:
        """Whether a conditional request can revalidate it."""
        return self.etag is not None or self.last_modified is not None


Resource = tuple[str, str, bytes]  # route, upstream, target
Key = tuple[Resource, tuple[Any, ...]]  # the resource, then consumer and key_headers values


class MemoryCache:
    """Stored answers in this process, least recently used dropped first.

    A key holds up to ``_MAX_VARIANTS`` answers, one per set of values of the fields its
    answers' ``Vary`` names. ``size`` counts bodies, fields and a fixed overhead each.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = 0
        self._entries: OrderedDict[Key, list[Entry]] = OrderedDict()
        self._keys: dict[Resource, set[Key]] = {}  # for invalidation by target

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def find(self, key: Key, headers: Headers) -> Entry | None:
        variants = self._entries.get(key)
        if variants is None:
            return None
        self._entries.move_to_end(key)
        for entry in variants:
            if entry.vary_values == _values(entry.vary, headers):
                return entry
        return None

    def holds(self, key: Key, entry: Entry) -> bool:
        variants = self._entries.get(key)
        return variants is not None and any(e is entry for e in variants)

    def put(self, key: Key, entry: Entry) -> None:
        if entry.size > self.max_size:
            return  # it would push out everything else, then itself
        variants = self._entries.get(key)
        if variants is None:
            variants = self._entries[key] = []
            self._keys.setdefault(key[0], set()).add(key)
        else:
            self._entries.move_to_end(key)
        for i, old in enumerate(variants):
            if old.vary == entry.vary and old.vary_values == entry.vary_values:
                self.size -= old.size
                del variants[i]
                break
        variants.insert(0, entry)
        self.size += entry.size
        while len(variants) > _MAX_VARIANTS:
            self.size -= variants.pop().size
        while self.size > self.max_size and self._entries:
            self._drop_oldest()

    def resized(self, key: Key, entry: Entry, before: int) -> None:
        """``entry`` changed its fields: its size went from ``before`` (counted only
        while it is stored: an unsafe method may have dropped it meanwhile)."""
        if self.holds(key, entry):
            self.size += entry.size - before
            while self.size > self.max_size and self._entries:
                self._drop_oldest()

    def remove(self, key: Key, entry: Entry) -> None:
        variants = self._entries.get(key)
        if variants is not None and self.holds(key, entry):
            variants[:] = [e for e in variants if e is not entry]
            self.size -= entry.size
            if not variants:
                self._forget(key)

    def invalidate(self, resource: Resource) -> int:
        """Drop every answer stored for ``resource``; returns how many."""
        dropped = 0
        for key in list(self._keys.get(resource, ())):
            variants = self._entries.get(key, [])
            dropped += len(variants)
            self.size -= sum(e.size for e in variants)
            self._forget(key)
        return dropped

    def purge(self, route: str | None, target: bytes | None, prefix: bool) -> int:
        """Drop the answers of ``route`` (None: any) for ``target`` (a prefix of it when
        ``prefix``; None: any); returns how many."""
        dropped = 0
        for resource in list(self._keys):
            if _selects(resource, route, target, prefix):
                dropped += self.invalidate(resource)
        return dropped

    def _forget(self, key: Key) -> None:
        self._entries.pop(key, None)
        keys = self._keys.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys[key[0]]

    def _drop_oldest(self) -> None:
        key, variants = next(iter(self._entries.items()))
        self.size -= sum(e.size for e in variants)
        self._forget(key)
        _evictions.inc()


def _selects(resource: Resource, route: str | None, target: bytes | None, prefix: bool) -> bool:
    """Whether a purge of ``route`` and ``target`` (see Cache.purge) takes ``resource``."""
    if route is not None and resource[0] != route:
        return False
    if target is None:
        return True
    return resource[2].startswith(target) if prefix else resource[2] == target


# -- the body as it streams -----------------------------------------------------------


class _Budget:
    """Bytes the answers being fetched may hold in memory, over all of them."""

    __slots__ = ("left",)

    def __init__(self, size: int) -> None:
        self.left = size

    def take(self, n: int) -> bool:
        if n > self.left:
            return False
        self.left -= n
        return True

    def give(self, n: int) -> None:
        self.left += n


class _Filling:
    """A chunked body on its way to the client, kept (up to ``cap`` bytes, and as long
    as ``budget`` allows) so that it can be stored once it has ended whole; ``done``
    gets the body, or None when it was cut, abandoned or too large. Passes the inner
    stream's ``poll`` on."""

    __slots__ = ("_budget", "_cap", "_done", "_inner", "_it", "_parts", "_poll", "_size")

    def __init__(
        self, inner: BodyStream, cap: int, budget: _Budget, done: Callable[[bytes | None], Any]
    ) -> None:
        self._inner = inner
        self._it = inner.__aiter__()
        self._poll: Callable[[], Any] | None = getattr(inner, "poll", None)
        self._cap = cap
        self._budget = budget
        self._parts: list[bytes] | None = []
        self._size = 0
        self._done: Callable[[bytes | None], Any] | None = done

    def __aiter__(self) -> _Filling:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._it.__anext__()
        except StopAsyncIteration:
            self._finish(whole=True)
            raise
        except BaseException:
            self._finish(whole=False)
            raise
        self._keep(chunk)
        return chunk

    def poll(self) -> Any:
        if self._poll is None:
            return None
        try:
            chunk = self._poll()
        except BaseException:
            self._finish(whole=False)
            raise
        if chunk is END:
            self._finish(whole=True)
        elif chunk is not None:
            self._keep(chunk)
        return chunk

    def _keep(self, chunk: bytes) -> None:
        parts = self._parts
        if parts is None:
            return
        if self._size + len(chunk) > self._cap or not self._budget.take(len(chunk)):
            self._finish(whole=False)  # too large, or too much being fetched at once
            return
        self._size += len(chunk)
        parts.append(bytes(chunk))

    def _finish(self, whole: bool) -> None:
        done, self._done = self._done, None
        parts, self._parts = self._parts, None
        self._budget.give(self._size)
        self._size = 0
        if done is not None:
            done(b"".join(parts) if whole and parts is not None else None)

    async def aclose(self) -> None:
        self._finish(whole=False)
        await self._inner.aclose()


async def _discard(response: Response) -> None:
    """Drop an answer nobody will see (a 304, a failure a stale answer stands in for).
    When its body has already arrived whole (a 304's, a short error page's), its
    connection goes back to the pool, as the engine's own 304s do; it is closed
    otherwise, without waiting for more."""
    poll = getattr(response.stream, "poll", None)
    if poll is not None:
        try:
            for _ in range(_DRAIN_CHUNKS):
                chunk = poll()
                if chunk is END:
                    response.stream = None
                    return
                if chunk is None:
                    break
        except GatewayError:  # (the body broke: the stream has closed its connection)
            response.stream = None
            return
    await response.aclose()


async def _read_whole(response: Response) -> bytes:
    """The rest of ``response``'s streamed body, read now (closed if that fails)."""
    stream = response.stream
    assert stream is not None
    parts: list[bytes] = []
    try:
        async for chunk in stream:
            parts.append(chunk)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return b"".join(parts)


class Cache(Filter):
    """A shared HTTP cache in front of the upstream (RFC 9111): the README's "Caching"."""

    name = "cache"
    stage = Stage.EDGE
    Config = CacheConfig

    def __init__(self, config: CacheConfig, context: FilterContext) -> None:
        super().__init__(config, context)
        self.config: CacheConfig = config
        self.store = MemoryCache(int(config.max_size))
        self._statuses = frozenset(config.statuses)
        self._ttl = float(config.ttl)
        self._stale = float(config.stale_if_error)
        self._updating = float(config.stale_while_revalidate)
        self._lock_timeout = float(config.lock_timeout)
        self._max_entry = int(config.max_entry_size)
        named = (checked_field(n, "")[0] for n in config.key_headers)
        self._key_headers = tuple(dict.fromkeys((*_KEYED, *named)))
        self._bypass = _BYPASS if config.cookies else _BYPASS | {b"cookie"}
        self._status_header = (
            checked_field(config.status_header, "")[0] if config.status_header else None
        )
        # Misses being fetched, by key: the event is set once the answer is stored or
        # known not to be.
        self._filling: dict[Key, trio.Event] = {}
        # What answers being fetched may hold in memory before they are stored.
        self._budget = _Budget(int(config.max_size))
        # Where stale answers served (stale-while-revalidate) are refreshed: open while
        # the instance is in use (``background``).
        self._nursery: trio.Nursery | None = None
        self._refreshing: set[Entry] = set()  # stale answers refreshed in the background
        # Answers fetched across a change of what they stand for are not stored: each
        # invalidation and purge moves ``_epoch`` on; ``_changed`` holds the epoch of
        # each target's last invalidation, ``_purges`` the last purges (epoch and
        # selector); before ``_forgotten``, every answer counts as changed.
        self._epoch = 0
        self._changed: dict[Resource, int] = {}
        self._purges: collections.deque[tuple[int, str | None, bytes | None, bool]] = (
            collections.deque()
        )
        self._forgotten = 0

    async def background(self) -> None:
        """Run the refreshes of answers served stale while the instance is in use; a
        reload that drops the instance cancels those still running."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def purge(
        self, route: str | None = None, target: bytes | None = None, prefix: bool = False
    ) -> int:
        """The admin listener's ``DELETE /cache``: drop the stored answers of ``route``
        (of every route when None) for ``target`` as sent upstream (those starting with
        it when ``prefix``; every target when None); returns how many. Answers it takes
        that are being fetched meanwhile are not stored: they may be what the purge is
        meant to end."""
        self._epoch += 1
        if len(self._purges) >= _MAX_CHANGED:
            self._forgotten = self._purges.popleft()[0]
        self._purges.append((self._epoch, route, target, prefix))
        return self.store.purge(route, target, prefix)

    def _invalidate(self, resource: Resource) -> None:
        """A change went through for ``resource``: drop what is stored, and keep what is
        being fetched from being stored."""
        self._epoch += 1
        if len(self._changed) >= _MAX_CHANGED:  # as a purge: nothing fetched is stored
            self._changed.clear()
            self._forgotten = self._epoch
        self._changed[resource] = self._epoch
        self.store.invalidate(resource)

    def _current(self, resource: Resource, since: int) -> bool:
        """Whether an answer asked for at epoch ``since`` is still what ``resource`` is."""
        if self._forgotten > since or self._changed.get(resource, 0) > since:
            return False
        for epoch, route, target, prefix in reversed(self._purges):
            if epoch <= since:
                break
            if _selects(resource, route, target, prefix):
                return False
        return True

    def snapshot(self) -> dict[str, int]:
        """What the admin listener's ``/plugins`` shows of this cache."""
        store = self.store
        return {
            "answers": len(store),
            "bytes": store.size,
            "max_size": store.max_size,
            "misses_being_fetched": len(self._filling),
            "bytes_being_fetched": int(self.config.max_size) - self._budget.left,
            "refreshing_in_background": len(self._refreshing),
        }

    def _resource(self, exchange: Exchange, call: UpstreamCall) -> Resource:
        route = exchange.route.name if exchange.route is not None else ""
        return (route, call.upstream, call.target)

    def _key(self, exchange: Exchange, call: UpstreamCall) -> Key:
        consumer: tuple[str, str] | None = None
        identity = exchange.identity
        if identity is not None and self.config.per_consumer:
            consumer = (identity.source, identity.consumer)  # (two issuers may share ids)
        return (
            self._resource(exchange, call),
            (consumer, *_values(self._key_headers, call.headers)),
        )

    def _count(self, exchange: Exchange, status: str) -> None:
        _responses.inc(
            route=exchange.route.name if exchange.route is not None else "", status=status
        )

    def _mark(self, exchange: Exchange, response: Response, status: bytes) -> None:
        if self._status_header is not None:  # (in place of one from the upstream)
            response.headers.set_checked((self._status_header, status))
        self._count(exchange, status.decode().lower())

    async def around_upstream(
        self, exchange: Exchange, call: UpstreamCall, call_next: CallNext
    ) -> Response:
        method = call.method
        if method != _GET and method != _HEAD:
            response = await call_next(call)
            if method not in _SAFE and response.status < 400:
                # A change went through: what is stored for the target is out of date.
                self._invalidate(self._resource(exchange, call))
            return response
        if call.upgrade is not None or call.body is not None:
            response = await call_next(call)
            self._mark(exchange, response, b"BYPASS")
            return response
        headers = call.headers
        conditional = False
        bypass = self._bypass
        for name, _ in headers.items:
            if name in _CONDITIONALS:
                conditional = True
            elif name in bypass:
                response = await call_next(call)
                self._mark(exchange, response, b"BYPASS")
                return response
        key = self._key(exchange, call)
        now = trio.current_time()
        entry = self.store.find(key, headers)
        if entry is not None:
            if entry.fresh(now):
                return self._serve(exchange, entry, headers, now, b"HIT")
            if entry.may_serve_updating(now) and self._nursery is not None:
                # Served stale at once; one request at a time brings it up to date.
                if entry not in self._refreshing:
                    self._update_later(key, entry, exchange, call, call_next)
                return self._serve(exchange, entry, headers, now, b"UPDATING")
        if method == _HEAD:  # the GET's answer is what is stored; a HEAD stores nothing
            response = await call_next(call)
            self._mark(exchange, response, b"MISS")
            return response

        since = self._epoch  # (an answer fetched across a change is not stored)
        lock: trio.Event | None = None
        if self._lock_timeout > 0:
            filling = self._filling.get(key)
            if filling is not None:
                # A miss of this key is on its way: its answer may do for this one too.
                with trio.move_on_after(self._lock_timeout):
                    await filling.wait()
                now = trio.current_time()
                entry = self.store.find(key, headers)
                if entry is not None and entry.fresh(now):
                    return self._serve(exchange, entry, headers, now, b"HIT")
            if key not in self._filling:
                lock = self._filling[key] = trio.Event()
        try:
            # The client's conditionals go (the cache wants a whole answer); the cache's
            # own take their place when it holds a stale answer it can revalidate.
            items = headers.items
            if conditional:
                items = [(n, v) for n, v in items if n not in _CONDITIONALS]
            revalidating = entry is not None and entry.validated
            if revalidating:
                assert entry is not None
                items = [*items, *entry.conditionals()]
            cookies: list[tuple[bytes, bytes]] = []  # a 304's, for this client only
            try:
                try:
                    if items is not headers.items:
                        call.headers = Headers(items)
                    response = await call_next(call)
                    if revalidating and response.status == 304:
                        assert entry is not None
                        await _discard(response)
                        if _same_representation(entry, response.headers):
                            now = trio.current_time()
                            cookies = self._refresh(key, entry, response.headers.items, now)
                            return self._serve(
                                exchange, entry, headers, now, b"REVALIDATED", cookies
                            )
                        # A 304 for another representation than the one stored: fetch it.
                        cookies = [(n, v) for n, v in response.headers if n == b"set-cookie"]
                        self.store.remove(key, entry)
                        entry = None
                        call.headers = Headers(
                            [(n, v) for n, v in headers.items if n not in _CONDITIONALS]
                        )
                        response = await call_next(call)
                finally:
                    call.headers = headers
            except GatewayError:
                now = trio.current_time()
                if entry is not None and entry.may_stand_in(now):
                    return self._serve(exchange, entry, headers, now, b"STALE")
                raise
            now = trio.current_time()
            fallback = is_fallback(exchange, response)
            failed = response.status in _FAILED or fallback
            if entry is not None and failed and entry.may_stand_in(now):
                await _discard(response)
                return self._serve(exchange, entry, headers, now, b"STALE")
            if not fallback:  # (a breaker's stand-in must not outlive the outage)
                try:
                    await self._fill(key, response, headers, now, since)
                except GatewayError:  # the body broke while it was read whole
                    now = trio.current_time()
                    if entry is not None and entry.may_stand_in(now):
                        return self._serve(exchange, entry, headers, now, b"STALE")
                    raise
            if entry is not None:
                self.store.remove(key, entry)  # replaced by this answer, or by none
            self._mark(exchange, response, b"EXPIRED" if entry is not None else b"MISS")
            response.headers.items += cookies  # (after _fill: never stored)
            return response
        finally:
            if lock is not None:
                self._release(key, lock)

    def _update_later(
        self, key: Key, entry: Entry, exchange: Exchange, call: UpstreamCall, call_next: CallNext
    ) -> None:
        """Start refreshing ``entry`` in the background, as the request that found it
        stale would have fetched it (its fields, the cache's conditionals)."""
        assert self._nursery is not None
        items = [(n, v) for n, v in call.headers.items if n not in _CONDITIONALS]
        request = Headers(list(items))
        items += entry.conditionals()
        update = UpstreamCall(
            upstream=call.upstream,
            method=_GET,  # (a HEAD finding it stale refreshes the GET's answer)
            target=call.target,
            headers=Headers(items),
            timeout=call.timeout,
            hash_key=call.hash_key,  # (balance = "hash": the target that owns it)
        )
        self._refreshing.add(entry)
        self._nursery.start_soon(
            self._update, key, entry, exchange, update, request, call_next, self._epoch
        )

    async def _update(
        self,
        key: Key,
        entry: Entry,
        exchange: Exchange,
        call: UpstreamCall,
        request: Headers,
        call_next: CallNext,
        since: int,
    ) -> None:
        """Bring ``entry`` up to date: refreshed by a ``304``, replaced by a new answer
        (or dropped, when that may not be stored), left as it is when the upstream
        fails (it stands in as long as it may) or takes longer than ``lock_timeout``
        (or the route's ``timeout``, when longer), body included."""
        route = exchange.route.name if exchange.route is not None else ""
        outcome: str | None = "failed"
        limit = max(self._lock_timeout, call.timeout or 0.0)
        try:
            with trio.fail_after(limit) if limit > 0 else contextlib.nullcontext():
                outcome = await self._bring_up_to_date(
                    key, entry, exchange, call, request, call_next, since
                )
        except trio.TooSlowError:
            self.context.logger.debug("refreshing %r in the background took too long", call.target)
        except GatewayError as e:
            self.context.logger.debug("refreshing %r in the background failed: %s", call.target, e)
        except Exception:
            self.context.logger.exception("refreshing %r in the background failed", call.target)
        except trio.Cancelled:  # the instance was dropped (a reload), or the gateway stops
            outcome = None
            raise
        finally:
            self._refreshing.discard(entry)
            if outcome is not None:
                _background_updates.inc(route=route, outcome=outcome)

    async def _bring_up_to_date(
        self,
        key: Key,
        entry: Entry,
        exchange: Exchange,
        call: UpstreamCall,
        request: Headers,
        call_next: CallNext,
        since: int,
    ) -> str:
        """``_update``'s fetch; what came of it: refreshed, dropped or failed."""
        response = await call_next(call)
        now = trio.current_time()
        if response.status == 304 and entry.validated:
            await _discard(response)
            if not _same_representation(entry, response.headers):
                self.store.remove(key, entry)  # outdated, says the upstream: fetched whole next
                return "dropped"
            self._refresh(key, entry, response.headers.items, now)
            # (a 304 that sets a cookie, or now forbids storing, drops it)
            return "refreshed" if self.store.holds(key, entry) else "dropped"
        if response.status in _FAILED or is_fallback(exchange, response):
            await _discard(response)
            return "failed"
        stored = await self._store_whole(key, response, request, now, since)
        if stored is not entry:
            self.store.remove(key, entry)  # replaced, or no longer to be kept
        return "refreshed" if stored is not None else "dropped"

    async def _store_whole(
        self, key: Key, response: Response, request: Headers, now: float, since: int
    ) -> Entry | None:
        """Read ``response`` whole and store it if it may be (nobody waits for its body);
        returns what was stored. Its connection is let go when it may not be stored."""
        entry = self._storable(response, request, now)
        stream = response.stream
        if entry is None or stream is None or response.status == 204:
            await _discard(response)
            if entry is not None:
                return entry if self._put(key, entry, response.body or b"", since) else None
            return None
        parts: list[bytes] = []
        taken = 0
        try:
            async for chunk in stream:
                taken += len(chunk)
                if taken > self._max_entry or not self._budget.take(len(chunk)):
                    taken -= len(chunk)
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                    return None  # too large, or too much being fetched at once
                parts.append(chunk)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        finally:
            self._budget.give(taken)
        response.stream = None
        return entry if self._put(key, entry, b"".join(parts), since) else None

    def _release(self, key: Key, lock: trio.Event) -> None:
        if self._filling.get(key) is lock:
            del self._filling[key]
        lock.set()

    def _storable(self, response: Response, request: Headers, now: float) -> Entry | None:
        """A new entry for ``response`` (its body still to come), or None when it must
        not be stored."""
        status = response.status
        if status not in self._statuses:
            return None
        items = response.headers.items
        chunked = False
        length: bytes | None = None
        for n, v in items:
            if n == b"set-cookie":
                return None  # one client's cookie must not reach the next
            if n == b"transfer-encoding":
                chunked = True
            elif n == b"content-length":
                length = v
        if response.body is None and response.stream is not None and status != 204:
            if length is not None:
                if int(length) > self._max_entry:
                    return None
            elif not chunked:
                return None  # close-delimited: a cut body would pass for whole
        cc = directives(items)
        if b"no-store" in cc or b"private" in cc:
            return None
        if (
            b"public" not in cc
            and b"s-maxage" not in cc
            and b"must-revalidate" not in cc
            and any(n == b"authorization" for n, _ in request.items)
        ):
            return None  # RFC 9111 3.5: an answer to a credential is that client's
        vary = _vary(items)
        if vary is None:
            return None
        # no-cache: stored, but revalidated before each use.
        lifetime = 0.0 if b"no-cache" in cc else freshness(cc, items, self._ttl)
        if lifetime is None:
            return None
        entry = Entry(
            status,
            response.reason,
            _kept(items),
            b"",
            now,
            lifetime,
            self._windows(cc),
            vary,
            _values(vary, request),
            _age(items),
        )
        # Stale at once with nothing to revalidate it: never of use, unless the upstream
        # itself says to serve it while the next is fetched (max-age=0,
        # stale-while-revalidate=N). The config's window is no leave to pass one
        # client's "do not reuse" answer to the next.
        own_window = _seconds(cc.get(b"stale-while-revalidate", b""))
        if lifetime <= 0 and not entry.validated and not (own_window and entry.update_window):
            return None
        return entry

    def _windows(self, cc: dict[bytes, bytes]) -> tuple[float, float]:
        """How long past its freshness an answer may stand in for a failed upstream
        (stale-if-error) and be served while it is refreshed (stale-while-revalidate):
        the config's or the upstream's own directive, whichever is longer; neither when
        the upstream forbids serving it stale."""
        if b"must-revalidate" in cc or b"proxy-revalidate" in cc or b"no-cache" in cc:
            return (0.0, 0.0)
        if b"s-maxage" in cc:
            return (0.0, 0.0)  # s-maxage includes proxy-revalidate (RFC 9111 5.2.2.10)
        on_error = float(_seconds(cc.get(b"stale-if-error", b"")) or 0)
        updating = float(_seconds(cc.get(b"stale-while-revalidate", b"")) or 0)
        return (max(self._stale, on_error), max(self._updating, updating))

    async def _fill(
        self, key: Key, response: Response, request: Headers, now: float, since: int
    ) -> None:
        """Store ``response`` if it may be. A body of known length is read whole first,
        at the upstream's pace (so that concurrent misses waiting for it are not held
        back by a slow client), and then sent as read; a chunked one is kept as it
        streams to the client and stored once it has ended whole."""
        entry = self._storable(response, request, now)
        if entry is None:
            return
        stream = response.stream
        if response.body is not None or stream is None or response.status == 204:
            # Whole already (a 204's body is empty whatever it says: its stream stays,
            # for the engine to release the connection clean).
            self._put(key, entry, response.body or b"", since)
            return
        length = _first(response.headers.items, b"content-length")
        if length is None:
            response.stream = _Filling(
                stream,
                self._max_entry,
                self._budget,
                lambda body: self._put(key, entry, body, since),
            )
            return
        size = int(length)  # (at most max_entry_size: _storable saw to it)
        if not self._budget.take(size):
            return  # too much being fetched at once: this one passes unstored
        try:
            body = await _read_whole(response)
        finally:
            self._budget.give(size)
        response.stream = None
        response.body = body
        self._put(key, entry, body, since)

    def _put(self, key: Key, entry: Entry, body: bytes | None, since: int) -> bool:
        """Store ``entry`` with ``body`` (None: cut, or too large), unless a purge came
        or a change of its target came since it was asked for (epoch ``since``); whether
        it was stored."""
        if body is None or len(body) > self._max_entry or not self._current(key[0], since):
            return False
        entry.body = body
        entry.size += len(body)
        self.store.put(key, entry)
        return True

    def _refresh(
        self, key: Key, entry: Entry, items: list[tuple[bytes, bytes]], now: float
    ) -> list[tuple[bytes, bytes]]:
        """A 304 revalidated ``entry``: its fields updated with the 304's (RFC 9111 3.2),
        its freshness from them; dropped if they now forbid storing it. Returns the
        304's ``Set-Cookie`` fields: for this client only, never stored (and an answer
        that sets a cookie is not kept)."""
        updates = _kept(items)
        cookies = [(n, v) for n, v in updates if n == b"set-cookie"]
        names = {
            n for n, _ in updates if n not in (b"content-type", b"content-encoding", b"set-cookie")
        }
        merged = [(n, v) for n, v in entry.headers if n not in names]
        merged += [(n, v) for n, v in updates if n in names]
        cc = directives(merged)
        before = entry.size
        lifetime = 0.0 if b"no-cache" in cc else freshness(cc, merged, self._ttl)
        entry.set_headers(merged, now, lifetime or 0.0, self._windows(cc), _age(items))
        if cookies or b"no-store" in cc or b"private" in cc or lifetime is None:
            self.store.remove(key, entry)
        else:
            self.store.resized(key, entry, before)
        return cookies

    def _serve(
        self,
        exchange: Exchange,
        entry: Entry,
        request: Headers,
        now: float,
        status: bytes,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> Response:
        if entry.status == 200 and _not_modified(entry, request):
            fields = [(n, v) for n, v in entry.headers if n in _NOT_MODIFIED_FIELDS]
            if entry.etag is None and entry.last_modified is not None:
                fields.append((b"last-modified", entry.last_modified))
            response = Response(304, Headers(fields))
        else:
            response = Response(
                entry.status, Headers(list(entry.headers)), body=entry.body, reason=entry.reason
            )
        response.headers.items.append((b"age", b"%d" % int(entry.age(now))))
        if extra:
            response.headers.items += extra
        self._mark(exchange, response, status)
        return response


def _kept(items: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The fields of an answer that are stored: not those of the connection (nor those
    its Connection field names), the framing, or Age."""
    named: set[bytes] = set()
    for n, v in items:
        if n == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    return [(n, v) for n, v in items if n not in _NOT_STORED and n not in named]


def _same_representation(entry: Entry, headers: Headers) -> bool:
    """Whether a 304 stands for ``entry`` (RFC 9111 4.3.4): its ETag, if it has one, is
    the stored one (strong tags compared strongly, weak ones weakly)."""
    tag = headers.get(b"etag")
    if tag is None or entry.etag is None:
        return tag is None
    if tag.startswith(b"W/") or entry.etag.startswith(b"W/"):
        return _tags(tag)[0] == _tags(entry.etag)[0]
    return tag == entry.etag


def _not_modified(entry: Entry, request: Headers) -> bool:
    """Whether the client's conditionals say it holds ``entry`` (RFC 9110 13.2.2): its
    If-None-Match (weak comparison), else its If-Modified-Since against Last-Modified."""
    inm = [v for n, v in request.items if n == b"if-none-match"]
    if inm:
        if entry.etag is None:
            return any(v.strip() == b"*" for v in inm)
        ours = _tags(entry.etag)[0]
        return any(t == b"*" or t == ours for v in inm for t in _tags(v))
    ims = _first(request.items, b"if-modified-since")
    if ims is None or entry.last_modified is None:
        return False
    since = _http_date(ims)
    modified = _http_date(entry.last_modified)
    return since is not None and modified is not None and modified <= since


@hookimpl
def filtergate_filters() -> list[type[Any]]:
    return [Cache]
