"""What filters see: the request, the response, and the exchange that carries both.

These are plain objects made once per request; their fields are the documented filter API
(see "Writing a plugin" in the README). Header names are lowercase ``bytes`` and values
``bytes`` everywhere, as h11 gives them; the helpers also accept ``str``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from engine.config import RouteConfig

__all__ = [
    "END",
    "FRAMING_HEADERS",
    "HOP_BY_HOP",
    "BodyStream",
    "Exchange",
    "Headers",
    "Identity",
    "Request",
    "Response",
    "Stash",
    "StashKey",
    "Timings",
    "TlsInfo",
    "Upgraded",
    "UpstreamCall",
    "preflight_method",
]

T = TypeVar("T")


def _b(name: bytes | str) -> bytes:
    return name.lower() if isinstance(name, bytes) else name.lower().encode("latin-1")


_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-z]+")

#: Header names (lowercase) that frame a message or a connection. The gateway writes
#: them itself; a filter whose config names one (a header to set or inject) is refused
#: at load, since a second Content-Length or a Transfer-Encoding would corrupt the
#: framing (request smuggling upstream, desync toward the client).
#: Query parameters a request may have when they are parsed (see Request.query).
MAX_QUERY_FIELDS = 1000

FRAMING_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade"}
)

#: The fields of one connection (RFC 9110 7.6.1), never passed on to the next hop, nor
#: stored with an answer; with those a ``Connection`` field names.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

# Names already checked, lowercased, by what the caller passed (bytes and str apart: a
# str and a bytes key must never be compared). Filters set headers with a few names from
# their config or code, so each name is checked once, not per request; the bound keeps
# a filter that makes up names from growing it without limit.
_CHECKED_BYTES: dict[bytes, bytes] = {}
_CHECKED_STR: dict[str, bytes] = {}
_MAX_CHECKED = 1024


def _check_name(name: bytes | str) -> bytes:
    """``name`` lowercased, once checked to be a token; remembered for the next time."""
    key = _b(name)
    if not _TOKEN.fullmatch(key):
        raise ValueError(f"invalid header name {key!r}")
    cache: dict[Any, bytes] = _CHECKED_BYTES if isinstance(name, bytes) else _CHECKED_STR
    if len(cache) < _MAX_CHECKED:
        cache[name] = key
    return key


def _field(name: bytes | str, value: bytes | str) -> tuple[bytes, bytes]:
    # The engine forwards header fields without re-validating them (h11 validated what
    # it parsed), so every field a filter adds is checked here, once: a value built from
    # a query parameter must never smuggle a CR LF into the upstream request.
    key = _CHECKED_BYTES.get(name) if isinstance(name, bytes) else _CHECKED_STR.get(name)
    if key is None:
        key = _check_name(name)
    val = value if isinstance(value, bytes) else value.encode()
    # Byte values, not b"\r": "int in bytes" is a memchr, several times faster here.
    if 13 in val or 10 in val or 0 in val:
        raise ValueError(f"invalid header value for {key!r}: contains CR, LF or NUL")
    return key, val.strip(b" \t")


_METHOD = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")


def preflight_method(items: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The method a CORS preflight announces (its ``Access-Control-Request-Method``), or
    None when the fields ``items`` (of an ``OPTIONS`` request) are no preflight's: no
    ``Origin``, or no method there."""
    method: bytes | None = None
    origin = False
    for name, value in items:
        if name == b"access-control-request-method":
            method = value
        elif name == b"origin":
            origin = True
    if not origin or method is None or _METHOD.fullmatch(method) is None:
        return None
    return method


def checked_field(name: bytes | str, value: bytes | str) -> tuple[bytes, bytes]:
    """``(name, value)`` as :meth:`Headers.set` would store it, checked as it checks it
    (``ValueError`` likewise); for :meth:`Headers.set_checked`, which checks no more.

    For a field prepared once and set on many requests (an identity header of a
    verified token), so the per-request work is only the replacing.
    """
    return _field(name, value)


class Headers:
    """An ordered multi-map of header fields: ``(lowercase name, value)`` byte pairs."""

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[bytes, bytes]] | None = None) -> None:
        self.items: list[tuple[bytes, bytes]] = items if items is not None else []

    def get(self, name: bytes | str, default: bytes | None = None) -> bytes | None:
        """The first value of ``name``, or ``default``."""
        key = _b(name)
        for n, v in self.items:
            if n == key:
                return v
        return default

    def get_all(self, name: bytes | str) -> list[bytes]:
        key = _b(name)
        return [v for n, v in self.items if n == key]

    def count(self, name: bytes | str) -> int:
        key = _b(name)
        return sum(1 for n, _ in self.items if n == key)

    def add(self, name: bytes | str, value: bytes | str) -> None:
        """Append a field, keeping any existing ones of the same name.

        Raises ``ValueError`` for a name that is not a token or a value with CR, LF or NUL.
        """
        self.items.append(_field(name, value))

    def add_vary(self, name: bytes) -> None:
        """Say in ``Vary`` that the answer depends on the request field ``name`` (a
        trusted name, as written: ``b"Origin"``), unless ``Vary`` names it already or
        is ``*``."""
        key = name.lower()
        for n, value in self.items:
            if n == b"vary":
                named = {v.strip().lower() for v in value.split(b",")}
                if key in named or b"*" in named:
                    return
        self.items.append((b"vary", name))

    def set(self, name: bytes | str, value: bytes | str) -> None:
        """Replace every field named ``name`` by one with ``value``."""
        self.set_checked(_field(name, value))

    def set_checked(self, field: tuple[bytes, bytes]) -> None:
        """:meth:`set` with a field :func:`checked_field` returned (not checked again)."""
        key = field[0]
        items = self.items
        for n, _ in items:
            if n == key:
                self.items = items = [(n, v) for n, v in items if n != key]
                break
        items.append(field)

    def remove(self, name: bytes | str) -> int:
        """Remove every field named ``name``; returns how many were removed."""
        key = _b(name)
        items = self.items
        for n, _ in items:
            if n == key:
                self.items = [(n, v) for n, v in items if n != key]
                return len(items) - len(self.items)
        return 0

    def remove_where(self, predicate: Callable[[bytes], bool]) -> int:
        """Remove every field whose (lowercase) name matches ``predicate``."""
        items = self.items
        for n, _ in items:
            if predicate(n):
                self.items = [(n, v) for n, v in items if not predicate(n)]
                return len(items) - len(self.items)
        return 0

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, bytes | str):
            return False
        key = _b(name)
        return any(n == key for n, _ in self.items)

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"Headers({self.items!r})"


END: Any = object()
"""What a body stream's ``poll()`` returns once the body has ended (see :class:`BodyStream`)."""


class BodyStream(Protocol):
    """A body that arrives in chunks; iterate it once, or close it to abandon it.

    A stream may also have ``poll()``, which never waits: the next chunk if it is already
    here, :data:`END` once the body has ended, or ``None`` when the next chunk must be
    awaited. The upstream's body has it, and a filter that wraps a stream should pass it
    on when the inner one has it (``getattr(inner, "poll", None)``): the ``compress``
    filter flushes only when nothing more is ready, so a stream without ``poll`` gets a
    flush after every chunk.
    """

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Upgraded(Protocol):
    """An upstream connection switched to another protocol (a 101 answer)."""

    #: The protocol the upstream switched to, as its Upgrade header named it.
    protocol: bytes

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class TlsInfo:
    version: str
    cipher: str
    server_name: str | None
    alpn: str | None


@dataclass(slots=True)
class Request:
    """The client's request as the gateway will forward it.

    ``path`` is the canonical path (dot segments removed, duplicate slashes merged,
    unreserved characters decoded): the path that was routed and that is forwarded.
    ``client`` is the real client address (honouring ``trusted_proxies``); ``peer`` is
    the TCP peer. ``body`` is set only on routes whose filters asked for the whole body;
    ``body_truncated`` says the body was larger than ``[server] max_buffered_body``, so
    ``body`` stays ``None`` and the body streams to the upstream untouched.
    """

    method: bytes
    path: str
    raw_query: bytes
    headers: Headers
    http_version: bytes
    client: str
    peer: tuple[str, int]
    scheme: str = "http"
    tls: TlsInfo | None = None
    body: bytes | None = None
    body_truncated: bool = False
    _query: dict[str, list[str]] | None = None

    @property
    def query(self) -> dict[str, list[str]]:
        """Query parameters, parsed once on first use. More than ``MAX_QUERY_FIELDS`` is
        a 400 (:class:`~engine.errors.BadRequest`): each costs microseconds to parse,
        and a head full of them milliseconds (Tomcat caps them at 1000 too)."""
        if self._query is None:
            try:
                self._query = parse_qs(
                    self.raw_query.decode("latin-1"),
                    keep_blank_values=True,
                    max_num_fields=MAX_QUERY_FIELDS,
                )
            except ValueError:
                from engine.errors import BadRequest

                raise BadRequest(f"more than {MAX_QUERY_FIELDS} query parameters") from None
        return self._query

    @property
    def target(self) -> bytes:
        """The request target as forwarded: canonical path plus query."""
        path = self.path.encode()
        return path + b"?" + self.raw_query if self.raw_query else path


@dataclass(slots=True)
class Response:
    """A response on its way to the client.

    Exactly one of ``body`` (the whole body, set by a filter, the gateway, or buffered
    for a filter that declared ``needs_response_body``) or ``stream`` (the upstream's
    body, relayed chunk by chunk) carries the body; both ``None`` means no body. When a
    filter replaces ``body``, the engine recomputes ``Content-Length``.
    """

    status: int
    headers: Headers = field(default_factory=Headers)
    body: bytes | None = None
    stream: BodyStream | None = None
    reason: bytes = b""
    # A 101 from the upstream to a request that asked to switch protocols: the
    # connection now speaking the new protocol (the engine relays it to the client).
    upgraded: Upgraded | None = None

    async def aclose(self) -> None:
        """Abandon a streamed body (its upstream connection is not reused), or the
        connection an upgrade left."""
        if self.stream is not None:
            stream, self.stream = self.stream, None
            await stream.aclose()
        if self.upgraded is not None:
            upgraded, self.upgraded = self.upgraded, None
            await upgraded.aclose()


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the caller is, as verified by an authenticate-stage filter."""

    consumer: str
    groups: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    claims: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""


class StashKey(Generic[T]):
    """A typed key into :class:`Stash`; create one per value at module level."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash(dict["StashKey[Any]", Any]):
    """Values filters pass to later filters, keyed by :class:`StashKey` for typing.

    A ``dict`` underneath, so that its reads and writes (several per request) run in C;
    the signatures below are what type checkers see: a ``StashKey[T]`` gives a ``T``.
    """

    __slots__ = ()

    if TYPE_CHECKING:

        def __setitem__(self, key: StashKey[T], value: T) -> None: ...

        def __getitem__(self, key: StashKey[T]) -> T: ...

        def get(self, key: StashKey[T], default: T | None = None) -> T | None: ...


@dataclass(slots=True)
class Timings:
    """``trio.current_time()`` stamps of one exchange; ``None`` until reached."""

    start: float
    routed: float | None = None
    upstream_start: float | None = None
    upstream_headers: float | None = None
    end: float | None = None


@dataclass(slots=True)
class UpstreamCall:
    """One call to an upstream, as ``around_upstream`` filters see and may change it.

    ``body`` is ``None`` (no body), ``bytes`` (buffered: the call can be replayed) or a
    stream (the client's body, forwarded as it arrives: not replayable once started).
    ``exclude`` holds targets (``host:port``) a retry should avoid; ``target_address``
    is set by the pool to the target it picked. ``body_length`` is the length of a
    streamed body when known (else it is sent chunked). ``timeout`` bounds the whole call,
    retries included: the pool sets ``deadline`` (an instant of trio's clock) at the first
    attempt, and every attempt ends by it. ``per_try_timeout`` bounds each attempt.
    """

    upstream: str
    method: bytes
    target: bytes
    headers: Headers
    body: bytes | BodyStream | None = None
    timeout: float | None = None
    attempt: int = 0
    exclude: set[str] = field(default_factory=set)
    target_address: str | None = None
    body_started: bool = False
    body_length: int | None = None
    # (Fields added later go last: code that builds calls by position keeps working.)
    per_try_timeout: float | None = None
    deadline: float | None = None
    # The engine's own proxied call: whether its client has gone (looked at while the
    # upstream is slow to answer, to let go of a call nobody waits for).
    client_gone: Callable[[], bool] | None = None
    # The protocols the client asked to switch to (its Upgrade header, those the route
    # allows), sent upstream with the request; ``None``: no upgrade is asked. Only a
    # call without a body asks.
    upgrade: bytes | None = None
    # With ``balance = "hash"``: the key whose target the call goes to (the engine sets
    # it for the call it proxies, from the upstream's ``hash_on``); None: round robin.
    hash_key: bytes | None = None

    @property
    def replayable(self) -> bool:
        """Whether sending this call again cannot lose or duplicate body bytes."""
        return self.body is None or isinstance(self.body, bytes) or not self.body_started


@dataclass(slots=True)
class Exchange:
    """One request and its response, passed to every phase of every filter."""

    request: Request
    request_id: str
    timings: Timings
    route: RouteConfig | None = None
    captures: dict[str, str] = field(default_factory=dict)
    identity: Identity | None = None
    stash: Stash = field(default_factory=Stash)
    response: Response | None = None
    error: Exception | None = None
    upstream_target: str | None = None
    bytes_sent: int = 0  # of the response to the client, head included (set before on_log)
    # In on_log: the client did not get the response whole (it left before an answer:
    # ``response`` None, ``error`` ClientGone; or the response was cut off midway).
    aborted: bool = False
    # Headers the route's filters read credentials from (their ``credential_headers``):
    # identity-header stripping leaves them to the filter that reads them.
    credential_headers: frozenset[bytes] = frozenset()
    caller: Callable[[Exchange, UpstreamCall], Awaitable[Response]] | None = None
    # Whether the client has closed its connection: a call a filter makes through
    # ``call_upstream`` is let go (``ClientGone``) when its client has gone.
    client_gone: Callable[[], bool] | None = None

    async def call_upstream(self, call: UpstreamCall) -> Response:
        """Send ``call`` through the route's ``around_upstream`` filters and the pool.

        The response's body streams: read it (``async for chunk in response.stream``)
        or ``await response.aclose()``. Raises the gateway errors of the upstream layer
        (:class:`~engine.errors.UpstreamUnreachable`, :class:`~engine.errors.UpstreamTimeout`,
        :class:`~engine.errors.NoHealthyTarget`, :class:`~engine.errors.CircuitOpen` ...).
        """
        if self.caller is None:
            raise RuntimeError("this exchange is not attached to a running gateway")
        return await self.caller(self, call)
