"""The ``transform`` filter: reshape requests and responses in flight.

Request side: header add/set/append/remove/rename, a regex path rewrite, query parameter
add/set/remove, a method override, JSON body edits. Response side: header
add/set/append/remove/rename, status mapping (optionally replacing the body by the
gateway's own error body so upstream internals never leak), JSON body edits.

Everything is compiled at config load; per request the filter runs precompiled
operations. Values are templates (see :mod:`plugins._template`); a value whose template
finds nothing renders as the empty string (or the ``|default``).

Bodies are only buffered when JSON edits are configured for that direction, and only
JSON bodies (``application/json`` or ``application/*+json``) in identity encoding are
rewritten. JSON here is RFC 8259: ``NaN``/``Infinity``, numbers beyond a double and
nesting deeper than the parser's recursion limit are invalid, and the filter never
writes them. A body that is not valid JSON, compressed, or larger than
``[server] max_buffered_body`` passes through unchanged and is counted in
``filtergate_transform_body_skipped_total``.

With ``mandatory = true`` a body the filter cannot edit never passes unedited, since
many upstreams parse JSON whatever the Content-Type says, accept what this parser
refuses (trailing commas) and read duplicate keys first-wins where it reads them
last-wins. A request body is refused: 415 when its Content-Type is not JSON or it has
a content coding, 400 when it is not valid JSON, 413 when it is over the buffer cap. A
response body with a JSON Content-Type is replaced by a 502 when it is compressed,
invalid or over the cap (the filter asks the upstream for ``Accept-Encoding:
identity`` so that a client's gzip never causes one). The body is re-serialized even
when the edits change nothing, so the receiver reads exactly the document the
gateway edited.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote_plus

import trio

from engine.chain import Filter, FilterContext, Stage
from engine.errors import (
    BadGateway,
    BadRequest,
    GatewayError,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
    UpstreamTimeout,
    reason_phrase,
    render_error,
)
from engine.exchange import FRAMING_HEADERS, Exchange, Headers, Request, Response, checked_field
from engine.metrics import counter
from engine.plugins import hookimpl
from engine.schema import ByteSize, Invalid
from plugins._json import NotJson, dump_json, load_json
from plugins._jsonpath import MISSING, JsonPath, JsonPathError, TooManyPlaces
from plugins._template import (
    Lookup,
    Ref,
    Template,
    TemplateError,
    compile_template,
    exchange_lookup,
)
from plugins._threads import one_at_a_time

__all__ = [
    "HeaderOps",
    "JsonOps",
    "PathRewrite",
    "QueryOps",
    "RequestTransform",
    "ResponseTransform",
    "Transform",
    "TransformConfig",
]

BODY_SKIPPED = counter(
    "filtergate_transform_body_skipped_total",
    "JSON bodies the transform filter left unchanged, by reason "
    "(invalid_json, compressed, too_large)",
    ("route", "direction", "reason"),
)

_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_METHOD_RE = re.compile(r"[A-Z]+")
# Control characters would split a header line; a rendered value never carries them.
_CTL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_GROUP_REF_RE = re.compile(r"\\(\d+)|\\g<(\w+)>")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
# A "." or ".." segment, also percent-encoded or with path parameters ("..;x", which
# servlet containers read as ".."): an upstream resolves it, so a rewrite that
# makes one from a client's path (a segment "..x" cut by the pattern) would let the
# client climb out of the prefix the replacement puts it under.
_DOT_SEGMENT_RE = re.compile(r"(?:^|/)(?:\.|%2[eE]){1,2}(?:(?:;|%3[bB])[^/]*)?(?:/|$)")
# Upstream statuses the filter sees are final ones (the engine skips 1xx); a 1xx sent
# in their place would tell the client another response or another protocol follows.
_FINAL_STATUS_RE = re.compile(r"[2-5][0-9][0-9]")


def _check_header_name(key: str, name: str) -> None:
    if not _TOKEN_RE.fullmatch(name.lower()):
        raise Invalid(key, f"not a valid header name: {name!r}")
    if name.lower() in FRAMING_HEADERS:
        raise Invalid(key, f"{name!r} is a framing header the gateway manages")


def _check_template(key: str, text: str) -> None:
    try:
        compile_template(text)
    except TemplateError as e:
        raise Invalid(key, str(e)) from None


def _check_value(key: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise Invalid(key, f"{value} is not a JSON number")
    if isinstance(value, str):
        _check_template(key, value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_value(f"{key}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_value(f"{key}[{i}]", v)


def _check_path(key: str, text: str) -> JsonPath:
    try:
        path = JsonPath.parse(text)
    except JsonPathError as e:
        raise Invalid(key, str(e)) from None
    if not path.segments:
        raise Invalid(key, "the path must name a field, not the whole document")
    return path


@dataclass(frozen=True)
class HeaderOps:
    """Header edits, applied in the order remove, rename, set, add, append."""

    remove: list[str] = field(
        default_factory=list, metadata={"doc": "header names to delete (every field of each)"}
    )
    rename: dict[str, str] = field(
        default_factory=dict, metadata={"doc": "old name -> new name, values kept"}
    )
    set: dict[str, str] = field(
        default_factory=dict,
        metadata={"doc": "name -> template; replaces every existing field of that name"},
    )
    add: dict[str, str] = field(
        default_factory=dict, metadata={"doc": "name -> template; only when the header is absent"}
    )
    append: dict[str, str] = field(
        default_factory=dict,
        metadata={"doc": "name -> template; one more field, existing ones kept"},
    )

    def __post_init__(self) -> None:
        for i, name in enumerate(self.remove):
            _check_header_name(f"remove[{i}]", name)
        for old, new in self.rename.items():
            _check_header_name(f"rename.{old}", old)
            _check_header_name(f"rename.{old}", new)
        for op in ("set", "add", "append"):
            for name, value in getattr(self, op).items():
                _check_header_name(f"{op}.{name}", name)
                _check_template(f"{op}.{name}", value)

    @property
    def empty(self) -> bool:
        return not (self.remove or self.rename or self.set or self.add or self.append)


@dataclass(frozen=True)
class QueryOps:
    """Query parameter edits, applied in the order remove, set, add."""

    remove: list[str] = field(default_factory=list, metadata={"doc": "parameter names to delete"})
    set: dict[str, str] = field(
        default_factory=dict, metadata={"doc": "name -> template; replaces every existing value"}
    )
    add: dict[str, str] = field(
        default_factory=dict, metadata={"doc": "name -> template; only when the name is absent"}
    )

    def __post_init__(self) -> None:
        for op in ("set", "add"):
            for name, value in getattr(self, op).items():
                _check_template(f"{op}.{name}", value)

    @property
    def empty(self) -> bool:
        return not (self.remove or self.set or self.add)


@dataclass(frozen=True)
class JsonOps:
    """JSON body edits by dotted path, applied in the order remove, rename, set, add."""

    remove: list[str] = field(
        default_factory=list, metadata={"doc": 'dotted paths to delete ("items[*].secret")'}
    )
    rename: dict[str, str] = field(
        default_factory=dict,
        metadata={"doc": "path -> new key (renamed in place) or path (moved)"},
    )
    set: dict[str, Any] = field(
        default_factory=dict,
        metadata={"doc": "path -> value (strings are templates); created or replaced"},
    )
    add: dict[str, Any] = field(
        default_factory=dict, metadata={"doc": "path -> value; only where the field is absent"}
    )
    mandatory: bool = field(
        default=False,
        metadata={
            "doc": "a body that cannot be edited is refused instead of passing through "
            "untouched (request: 415 not JSON or compressed, 400 invalid, 413 too large; "
            "response: 502)"
        },
    )
    max_size: ByteSize = field(
        default=ByteSize(4 * 1024 * 1024),
        metadata={
            "doc": "an edited body that would be larger is never built (a set over a "
            "client's array multiplies its value): it counts as too large"
        },
    )

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise Invalid("max_size", "must be at least 1 byte")
        for i, p in enumerate(self.remove):
            _check_path(f"remove[{i}]", p)
        for src, dst in self.rename.items():
            source = _check_path(f"rename.{src}", src)
            target = _check_path(f"rename.{src}", dst)
            try:
                source.check_rename(target)
            except JsonPathError as e:
                raise Invalid(f"rename.{src}", str(e)) from None
        for op in ("set", "add"):
            for p, value in getattr(self, op).items():
                _check_path(f"{op}.{p}", p)
                _check_value(f"{op}.{p}", value)

    @property
    def empty(self) -> bool:
        return not (self.remove or self.rename or self.set or self.add)


@dataclass(frozen=True)
class PathRewrite:
    """``re.sub(pattern, replacement, path, count=1)`` on the forwarded path."""

    pattern: str = field(metadata={"doc": "a Python regular expression matched on the path"})
    replacement: str = field(metadata={"doc": r'the new path; "\1" or "\g<name>" insert groups'})

    def __post_init__(self) -> None:
        try:
            compiled = re.compile(self.pattern)
        except re.error as e:
            raise Invalid("pattern", f"not a valid regular expression: {e}") from None
        for m in _GROUP_REF_RE.finditer(self.replacement):
            number, name = m.group(1), m.group(2)
            if number is not None and int(number) > compiled.groups:
                raise Invalid("replacement", f"group \\{number} is not in the pattern")
            if name is not None:
                if name.isdigit():
                    if int(name) > compiled.groups:
                        raise Invalid("replacement", f"group {name} is not in the pattern")
                elif name not in compiled.groupindex:
                    raise Invalid("replacement", f"group {name!r} is not in the pattern")
        if _DOT_SEGMENT_RE.search(_GROUP_REF_RE.sub("g", self.replacement)):
            raise Invalid("replacement", 'has a "." or ".." segment')


@dataclass(frozen=True)
class RequestTransform:
    method: str | None = field(default=None, metadata={"doc": "forward with this method"})
    path_rewrite: PathRewrite | None = field(
        default=None, metadata={"doc": "{ pattern, replacement } applied to the path"}
    )
    headers: HeaderOps = field(default_factory=HeaderOps)
    query: QueryOps = field(default_factory=QueryOps)
    json: JsonOps = field(default_factory=JsonOps)

    def __post_init__(self) -> None:
        if self.method is not None and not _METHOD_RE.fullmatch(self.method):
            raise Invalid("method", f"expected an upper-case method, got {self.method!r}")


@dataclass(frozen=True)
class ResponseTransform:
    status_map: dict[str, int] = field(
        default_factory=dict, metadata={"doc": 'upstream status -> status sent ("500" = 502)'}
    )
    error_body: bool = field(
        default=True,
        metadata={
            "doc": "a status mapped to 400 or more gets the gateway's generic error body "
            "instead of the upstream's"
        },
    )
    headers: HeaderOps = field(default_factory=HeaderOps)
    json: JsonOps = field(default_factory=JsonOps)

    def __post_init__(self) -> None:
        for key, value in self.status_map.items():
            if not _FINAL_STATUS_RE.fullmatch(key):
                raise Invalid(f"status_map.{key}", 'keys are final status codes like "500"')
            if isinstance(value, bool) or not 200 <= value <= 599:
                raise Invalid(f"status_map.{key}", f"not a final status code (200-599): {value}")


@dataclass(frozen=True)
class TransformConfig:
    request: RequestTransform = field(
        default_factory=RequestTransform,
        metadata={"doc": "method, path_rewrite, headers, query, json: edits on the way in"},
    )
    response: ResponseTransform = field(
        default_factory=ResponseTransform,
        metadata={"doc": "status_map, error_body, headers, json: edits on the way out"},
    )


# -- compiled operations ---------------------------------------------------------------

HeaderValue = bytes | Template


def _header_value(text: str) -> HeaderValue:
    template = compile_template(text)
    constant = template.constant
    return _CTL_RE.sub("", constant).encode() if constant is not None else template


def _render_header(template: Template, lookup: Lookup) -> bytes:
    return _CTL_RE.sub("", template.render(lookup, missing="")).encode("utf-8", "surrogateescape")


def _no_lookup(ref: Ref) -> Any:
    """The lookup given to plans whose values are all constant: never asked."""
    return MISSING


def _set_op(name: bytes, value: HeaderValue) -> tuple[bytes, tuple[bytes, bytes] | Template]:
    """A ``set`` operation: a constant value as its field, checked once here."""
    return name, checked_field(name, value) if isinstance(value, bytes) else value


class _HeaderPlan:
    __slots__ = ("add", "append", "drop", "needs_lookup", "rename", "set")

    def __init__(self, ops: HeaderOps) -> None:
        self.drop = frozenset(n.lower().encode() for n in ops.remove)
        self.rename = tuple((o.lower().encode(), n.lower().encode()) for o, n in ops.rename.items())
        self.set = tuple(_set_op(n.lower().encode(), _header_value(v)) for n, v in ops.set.items())
        self.add = tuple((n.lower().encode(), _header_value(v)) for n, v in ops.add.items())
        self.append = tuple((n.lower().encode(), _header_value(v)) for n, v in ops.append.items())
        # Only a template reads the exchange: a plan of constants needs no lookup made.
        values = [v for _, v in (*self.set, *self.add, *self.append)]
        self.needs_lookup = any(isinstance(v, Template) for v in values)

    def apply(self, headers: Headers, lookup: Lookup) -> None:
        drop = self.drop
        if drop:  # Headers.remove_where, without a call per name
            items = headers.items
            for n, _ in items:
                if n in drop:
                    headers.items = [f for f in items if f[0] not in drop]
                    break
        for old, new in self.rename:
            headers.items = [(new if n == old else n, v) for n, v in headers.items]
        # Constant values are checked fields already: no call to render or check them,
        # and set here as Headers.set_checked does (one call fewer per request).
        for name, op in self.set:
            if isinstance(op, tuple):
                items = headers.items
                for n, _ in items:
                    if n == name:
                        headers.items = items = [f for f in items if f[0] != name]
                        break
                items.append(op)
            else:
                headers.set(name, _render_header(op, lookup))
        for name, value in self.add:
            if name not in headers:
                headers.add(
                    name, value if isinstance(value, bytes) else _render_header(value, lookup)
                )
        for name, value in self.append:
            headers.add(name, value if isinstance(value, bytes) else _render_header(value, lookup))


def _query_name(segment: bytes) -> str:
    return unquote_plus(segment.partition(b"=")[0].decode("latin-1"))


class _QueryPlan:
    __slots__ = ("add", "drop", "set")

    def __init__(self, ops: QueryOps) -> None:
        self.drop = frozenset(ops.remove) | frozenset(ops.set)
        self.set = tuple((n, compile_template(v)) for n, v in ops.set.items())
        self.add = tuple((n, compile_template(v)) for n, v in ops.add.items())

    def apply(self, request: Request, lookup: Lookup) -> None:
        """Rewrite ``raw_query``; parameters not touched keep their exact bytes."""
        segments = [s for s in request.raw_query.split(b"&") if s]
        if self.drop:
            segments = [s for s in segments if _query_name(s) not in self.drop]
        present = {_query_name(s) for s in segments} if self.add else set()
        for name, template in self.set:
            segments.append(_query_pair(name, template.render(lookup, missing="")))
        for name, template in self.add:
            if name not in present:
                segments.append(_query_pair(name, template.render(lookup, missing="")))
        request.raw_query = b"&".join(segments)
        # The parsed view is cached on first use: drop it so it reflects the new query.
        request._query = None


def _query_pair(name: str, value: str) -> bytes:
    value_bytes = value.encode("utf-8", "surrogateescape")  # (a header's non-UTF-8 bytes)
    return f"{quote(name, safe='')}={quote(value_bytes, safe='')}".encode("ascii")


ValueFn = Callable[[Lookup], Any]


def _json_text(value: Any) -> Any:
    """A template's value for a JSON body: a header's bytes that are no UTF-8 (kept as
    surrogates, see plugins._template) become U+FFFD, not lone surrogates, which strict
    JSON parsers refuse."""
    if isinstance(value, str) and not value.isascii():
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def _compile_value(value: Any) -> ValueFn:
    if isinstance(value, str):
        template = compile_template(value)
        constant = template.constant
        if constant is not None:
            return lambda _lookup: constant
        return lambda lookup: _json_text(template.evaluate(lookup, missing=""))
    if isinstance(value, dict):
        items = [(k, _compile_value(v)) for k, v in value.items()]
        return lambda lookup: {k: fn(lookup) for k, fn in items}
    if isinstance(value, list):
        fns = [_compile_value(v) for v in value]
        return lambda lookup: [fn(lookup) for fn in fns]
    return lambda _lookup: value


class EditTooLarge(Exception):
    """The edited body would be larger than the plan's ``max_size``."""


class _JsonPlan:
    __slots__ = ("add", "mandatory", "max_size", "remove", "rename", "set")

    def __init__(self, ops: JsonOps) -> None:
        self.remove = tuple(JsonPath.parse(p) for p in ops.remove)
        self.rename = tuple((JsonPath.parse(s), JsonPath.parse(d)) for s, d in ops.rename.items())
        self.set = tuple((JsonPath.parse(p), _compile_value(v)) for p, v in ops.set.items())
        self.add = tuple((JsonPath.parse(p), _compile_value(v)) for p, v in ops.add.items())
        self.mandatory = ops.mandatory
        self.max_size = int(ops.max_size)

    def apply(self, doc: Any, lookup: Lookup, size: int) -> bool:
        """Edit ``doc`` (``size`` bytes as received) in place; returns whether anything
        changed. Raises :class:`EditTooLarge` before a set or add would take the document
        past ``max_size``: each place written grows it by the value's JSON size at most."""
        budget = [self.max_size - size]
        changed = 0
        for path in self.remove:
            changed += path.remove(doc)
        for source, target in self.rename:
            changed += source.rename(doc, target)
        for path, fn in self.set:
            changed += _write(doc, path, fn(lookup), budget, only_if_absent=False)
        for path, fn in self.add:
            if path.get(doc) is MISSING:
                changed += _write(doc, path, fn(lookup), budget, only_if_absent=True)
        return changed > 0

    def edit(self, body: bytes, lookup: Lookup) -> bytes | None:
        """``body`` edited, or ``None`` when nothing changed (never when mandatory).
        Raises :class:`NotJson` or :class:`EditTooLarge`."""
        doc = load_json(body)
        # Mandatory: always the gateway's serialization, even when nothing changed, so
        # duplicate keys or odd spellings never reach a parser that reads them
        # differently from this one.
        if not self.apply(doc, lookup, len(body)) and not self.mandatory:
            return None
        out = dump_json(doc)
        if len(out) > self.max_size:
            raise EditTooLarge()
        return out


def _write(doc: Any, path: JsonPath, value: Any, budget: list[int], *, only_if_absent: bool) -> int:
    """``path.set`` within ``budget[0]`` bytes of growth (spent here); the places written.
    Raises :class:`EditTooLarge` rather than pass the budget."""
    cost = _json_size(value) + 1  # and a separator
    limit = max(0, budget[0]) // cost
    try:
        written = path.set(doc, value, only_if_absent=only_if_absent, limit=limit)
    except TooManyPlaces:
        raise EditTooLarge() from None
    budget[0] -= written * cost
    return written


def _json_size(value: Any) -> int:
    """The size of ``value`` written as JSON (a string's, without dumping it)."""
    if isinstance(value, str):
        return len(value) * 6 + 2 if not value.isascii() else len(value) + 2 + value.count('"')
    return len(dump_json(value))


def is_json(content_type: bytes | None) -> bool:
    """Whether a Content-Type names JSON: ``application/json`` or ``application/*+json``."""
    if content_type is None:
        return False
    mime = content_type.partition(b";")[0].strip().lower()
    return mime == b"application/json" or (
        mime.startswith(b"application/") and mime.endswith(b"+json")
    )


def _is_compressed(headers: Headers) -> bool:
    encoding = headers.get(b"content-encoding")
    return encoding is not None and encoding.strip().lower() not in (b"", b"identity")


_STATUS_ERRORS: dict[int, type[GatewayError]] = {
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    502: BadGateway,
    503: ServiceUnavailable,
    504: UpstreamTimeout,
}


class _MappedError(GatewayError):
    """The gateway's error for a status it has no dedicated error type for."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.code = reason_phrase(status).decode().lower().replace(" ", "_") or "error"
        super().__init__()


def gateway_error_for(status: int) -> GatewayError:
    """The gateway's own error for ``status``, as the engine would answer it."""
    cls = _STATUS_ERRORS.get(status)
    return cls() if cls is not None else _MappedError(status)


async def replace_with_error(response: Response, err: GatewayError, request_id: str) -> None:
    """Turn ``response`` into the gateway's error response for ``err``, in place.

    The upstream's body is abandoned and none of its headers survive, so nothing of the
    upstream's internals reaches the client.
    """
    await response.aclose()
    status, headers, body = render_error(err, request_id)
    response.status = status
    response.reason = reason_phrase(status)
    response.headers = Headers(list(headers))
    response.body = body


class Transform(Filter):
    """Reshape requests and responses; see the module docstring."""

    name = "transform"
    stage = Stage.TRANSFORM
    Config = TransformConfig

    def __init__(self, config: TransformConfig, context: FilterContext) -> None:
        super().__init__(config, context)
        self.config: TransformConfig = config
        req, resp = config.request, config.response
        self._method = req.method.encode() if req.method is not None else None
        self._rewrite = (
            (re.compile(req.path_rewrite.pattern), req.path_rewrite.replacement)
            if req.path_rewrite is not None
            else None
        )
        self._req_headers = None if req.headers.empty else _HeaderPlan(req.headers)
        self._query = None if req.query.empty else _QueryPlan(req.query)
        self._req_json = None if req.json.empty else _JsonPlan(req.json)
        self._status_map = {int(k): v for k, v in resp.status_map.items()}
        self._error_body = resp.error_body
        self._resp_headers = None if resp.headers.empty else _HeaderPlan(resp.headers)
        self._resp_json = None if resp.json.empty else _JsonPlan(resp.json)
        # Whether the request side reads the exchange through templates at all.
        self._req_lookup = (
            self._req_json is not None
            or self._query is not None
            or (self._req_headers is not None and self._req_headers.needs_lookup)
        )
        # The engine reads these per instance: only a transform with JSON edits for a
        # direction makes the engine buffer that direction's body.
        vars(self).update(
            needs_request_body=self._req_json is not None,
            needs_response_body=self._resp_json is not None,
        )
        # A phase with nothing to do is hidden from the engine (it compiles the chain
        # from the instance's attributes), so it costs nothing per request.
        # Mandatory response edits cannot read a compressed body: ask for none, so that a
        # client's Accept-Encoding: gzip does not turn every answer into a 502.
        self._identity_response = self._resp_json is not None and self._resp_json.mandatory
        request_work = (
            self._req_json,
            self._rewrite,
            self._query,
            self._req_headers,
            self._method,
            self._identity_response,
        )
        if not any(request_work):
            vars(self)["on_request"] = None
        elif self._req_json is not None:
            vars(self)["on_request"] = self._on_request_with_body
        elif not (self._rewrite or self._query or self._method or self._identity_response):
            # Header edits only (the common case): the plan is applied directly, with no
            # step through on_request and _request_head, as on the response side.
            vars(self)["on_request"] = self._on_request_headers
        if not (self._status_map or self._resp_json or self._resp_headers):
            vars(self)["on_response"] = None
        elif not (self._status_map or self._resp_json):
            # Header edits only: nothing to wait for, so a plain call instead of a
            # coroutine per response (the engine decides sync or async per instance).
            vars(self)["on_response"] = self._on_response_headers

    # -- request side ----------------------------------------------------------------

    async def _on_request_with_body(self, exchange: Exchange) -> None:
        """on_request of an instance with request JSON edits: the body edit may wait
        for a worker thread."""
        lookup = exchange_lookup(exchange) if self._req_lookup else _no_lookup
        await self._transform_request_body(exchange, lookup)
        self._request_head(exchange, lookup)

    def on_request(self, exchange: Exchange) -> None:
        # Lazy: it reads the exchange only when a template asks for a value.
        lookup = exchange_lookup(exchange) if self._req_lookup else _no_lookup
        self._request_head(exchange, lookup)

    def _on_request_headers(self, exchange: Exchange) -> None:
        plan = self._req_headers
        assert plan is not None
        plan.apply(
            exchange.request.headers,
            exchange_lookup(exchange) if plan.needs_lookup else _no_lookup,
        )

    def _request_head(self, exchange: Exchange, lookup: Lookup) -> None:
        request = exchange.request
        if self._identity_response:
            request.headers.set(b"accept-encoding", b"identity")
        if self._rewrite is not None:
            pattern, replacement = self._rewrite
            path = pattern.sub(replacement, request.path, count=1)
            if path != request.path:
                if _DOT_SEGMENT_RE.search(path):
                    raise BadRequest("the rewritten path has a dot segment", close=False)
                request.path = quote(path if path.startswith("/") else "/" + path, safe=_PATH_SAFE)
        if self._query is not None:
            self._query.apply(request, lookup)
        if self._req_headers is not None:
            self._req_headers.apply(request.headers, lookup)
        if self._method is not None:
            request.method = self._method

    async def _transform_request_body(self, exchange: Exchange, lookup: Lookup) -> None:
        plan = self._req_json
        assert plan is not None
        request = exchange.request
        body = request.body
        if not (body or (body is None and _body_over_cap(request))):
            return  # no body: nothing to edit, nothing to refuse
        if not is_json(request.headers.get(b"content-type")):
            if plan.mandatory:
                raise UnsupportedMediaType("the request body must be application/json")
            return
        if _is_compressed(request.headers):
            self._skipped(exchange, "request", "compressed")
            if plan.mandatory:
                raise UnsupportedMediaType(
                    "the request body must not have a content coding",
                    headers=[(b"accept-encoding", b"identity")],
                )
            return
        if body is None:
            self._skipped(exchange, "request", "too_large")
            if plan.mandatory:
                raise PayloadTooLarge("the request body is too large to transform")
            return
        try:
            new = await self._rewrite_json(exchange, "request", body, plan, lookup)
        except NotJson as e:
            if plan.mandatory:
                # The whole body has been read: the connection's framing is intact.
                raise BadRequest(f"the request body is not valid JSON: {e}", close=False) from None
            return
        except EditTooLarge:
            # As any body that cannot be edited: passed on untouched unless mandatory
            # (check warns about removes without it: a client can make them skip).
            if plan.mandatory:
                raise PayloadTooLarge(
                    "the request body would be too large once transformed", close=False
                ) from None
            return
        if new is not None:
            request.body = new

    # -- response side ---------------------------------------------------------------

    async def on_response(self, exchange: Exchange, response: Response) -> None:
        replaced = False
        if self._status_map:
            status = self._status_map.get(response.status)
            if status is not None:
                if self._error_body and status >= 400:
                    await replace_with_error(
                        response, gateway_error_for(status), exchange.request_id
                    )
                    replaced = True
                else:
                    response.status = status
                    response.reason = reason_phrase(status)
        if self._resp_json is not None and not replaced:
            await self._transform_response_body(exchange, response)
        if self._resp_headers is not None:
            self._on_response_headers(exchange, response)

    def _on_response_headers(self, exchange: Exchange, response: Response) -> None:
        plan = self._resp_headers
        assert plan is not None
        plan.apply(response.headers, exchange_lookup(exchange) if plan.needs_lookup else _no_lookup)

    async def _transform_response_body(self, exchange: Exchange, response: Response) -> None:
        plan = self._resp_json
        assert plan is not None
        if not is_json(response.headers.get(b"content-type")):
            return
        if response.body is None:
            if response.stream is not None:
                self._skipped(exchange, "response", "too_large")
                if plan.mandatory:
                    await self._refuse_response(exchange, response, "is too large to transform")
            return
        if not response.body:
            if exchange.request.method == b"HEAD":
                # The GET's length is the unedited body's, which an edit changes: say
                # none rather than a wrong one.
                response.headers.remove(b"content-length")
            return
        if _is_compressed(response.headers):
            self._skipped(exchange, "response", "compressed")
            if plan.mandatory:
                await self._refuse_response(exchange, response, "has a content coding")
            return
        lookup = exchange_lookup(exchange)
        try:
            new = await self._rewrite_json(exchange, "response", response.body, plan, lookup)
        except NotJson:
            if plan.mandatory:
                await self._refuse_response(exchange, response, "is not valid JSON")
            return
        except EditTooLarge:
            if plan.mandatory:
                await self._refuse_response(exchange, response, "would be too large edited")
            return
        if new is not None:
            response.body = new
            # The engine recomputes Content-Length from the new body; a stale one must
            # not survive even if it is read before that.
            response.headers.remove(b"content-length")

    @staticmethod
    async def _refuse_response(exchange: Exchange, response: Response, why: str) -> None:
        err = BadGateway(f"the upstream's body {why}")
        await replace_with_error(response, err, exchange.request_id)

    async def _rewrite_json(
        self, exchange: Exchange, direction: str, body: bytes, plan: _JsonPlan, lookup: Lookup
    ) -> bytes | None:
        """The edited body, or ``None`` when it is unchanged (never with ``mandatory``).

        Raises :class:`NotJson` (counted as ``invalid_json``) when the body is not JSON
        or the edited document cannot be written as JSON, and :class:`EditTooLarge`
        (counted as ``too_large``). A body over ``_INLINE_EDIT`` is parsed, edited and
        written in a worker thread, one at a time per process: the event loop keeps
        serving others meanwhile (the GIL is handed back every few milliseconds), where
        a megabyte edited inline held every client for tenths of a second.
        """
        try:
            if len(body) <= _INLINE_EDIT:
                return plan.edit(body, lookup)
            return await trio.to_thread.run_sync(
                plan.edit, body, lookup, limiter=one_at_a_time("transform")
            )
        except NotJson:
            self._skipped(exchange, direction, "invalid_json")
            raise
        except EditTooLarge:
            self._skipped(exchange, direction, "too_large")
            raise

    def _skipped(self, exchange: Exchange, direction: str, reason: str) -> None:
        route = exchange.route.name if exchange.route is not None else ""
        BODY_SKIPPED.inc(route=route, direction=direction, reason=reason)
        if reason == "too_large":
            self.context.logger.warning(
                "route %s: %s body over the buffer cap, not transformed (request %s)",
                route,
                direction,
                exchange.request_id,
            )


#: Bodies larger than this are edited in a worker thread (see Transform._rewrite_json).
_INLINE_EDIT = 64 * 1024


def _body_over_cap(request: Request) -> bool:
    """Whether a request whose ``body`` is ``None`` has a body the engine did not buffer.

    The engine strips the framing headers from ``request.headers``; it marks a body
    over the buffer cap with ``body_truncated``. The header check serves exchanges
    built without the engine (tests, other callers) that keep them.
    """
    if getattr(request, "body_truncated", False):
        return True
    headers = request.headers
    length = headers.get(b"content-length")
    if length is not None:
        return length.strip() not in (b"", b"0")
    return b"transfer-encoding" in headers


@hookimpl
def filtergate_filters() -> list[type[Filter]]:
    return [Transform]
