"""The ``aggregate`` filter: answer one request by calling several backends (BFF).

A route with this filter never reaches its own upstream: the filter makes the configured
calls concurrently, each through ``exchange.call_upstream`` (so through the route's
``around_upstream`` filters, the upstream pool and its balancing), and answers with one
JSON document composed from their answers.

Calls may depend on each other: a call whose templates name another call
(``path = "/orders?user_id={user.id}"``) starts as soon as that call's answer has
arrived, and reads the value from that answer (before its ``fields`` shaping). The
dependency graph is checked at load: unknown names and cycles are config errors.

Failure semantics, all inside the overall ``timeout``:

* A call fails when it cannot be sent, answers a status outside 2xx, answers a body
  that is not JSON or larger than ``max_body``, lacks a value a template needs, or
  depends on a call that failed; it times out after its own ``timeout``.
* An optional call (``required = false``) that fails or times out is left out of the
  answer and named in the ``X-Aggregate-Partial`` header and the ``"_partial"`` body field.
* A required call that fails cancels every other call at once; the gateway answers 504
  (:class:`~engine.errors.UpstreamTimeout`) when it timed out, else 502
  (:class:`~engine.errors.BadGateway`), with its usual error body.
* When the overall deadline passes, unfinished optional calls count as timed out and an
  unfinished required call answers 504.

No backend header is passed to the client (so no backend ``Set-Cookie`` either); client
headers reach a backend only when listed in its ``forward_headers``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, unquote

import trio

from engine.chain import Filter, FilterContext, Stage
from engine.errors import BadGateway, BadRequest, ClientGone, GatewayError, UpstreamTimeout
from engine.exchange import FRAMING_HEADERS, Exchange, Headers, Response, UpstreamCall
from engine.metrics import counter
from engine.plugins import hookimpl
from engine.schema import ByteSize, Duration, Invalid
from plugins._json import NotJson, dump_json, load_json
from plugins._jsonpath import MISSING, JsonPath, JsonPathError
from plugins._template import (
    REQUEST_ROOTS,
    Lookup,
    MissingValue,
    Ref,
    Template,
    TemplateError,
    compile_template,
    exchange_lookup,
)

__all__ = ["Aggregate", "AggregateConfig", "CallConfig", "FieldsConfig"]

CALLS = counter(
    "filtergate_aggregate_calls_total",
    "Backend calls made by the aggregate filter, by outcome (ok, error, timeout, skipped)",
    ("route", "call", "outcome"),
)

PARTIAL_HEADER = b"x-aggregate-partial"
PARTIAL_FIELD = "_partial"

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_METHOD_RE = re.compile(r"[A-Z]+")
# Managed by the gateway's upstream layer; a call cannot meaningfully set them.
_RESERVED_HEADERS = FRAMING_HEADERS | {"host"}
_CTL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A closed connection is cleanup: it must finish even when the request is being
# cancelled, but never hold the request up for long.
_CLOSE_GRACE = 1.0


def _check_header_name(key: str, name: str) -> None:
    if not _TOKEN_RE.fullmatch(name.lower()):
        raise Invalid(key, f"not a valid header name: {name!r}")
    if name.lower() in _RESERVED_HEADERS:
        raise Invalid(key, f"{name!r} is managed by the gateway")


def _parse_path(key: str, text: str) -> JsonPath:
    try:
        return JsonPath.parse(text)
    except JsonPathError as e:
        raise Invalid(key, str(e)) from None


@dataclass(frozen=True)
class FieldsConfig:
    """Which fields of a call's answer are kept; applied as allow, deny, rename.

    When the (extracted) answer is an array, each object in it is shaped.
    """

    allow: list[str] | None = field(
        default=None, metadata={"doc": "dotted paths to keep (no wildcards); all when unset"}
    )
    deny: list[str] = field(default_factory=list, metadata={"doc": "dotted paths to drop"})
    rename: dict[str, str] = field(
        default_factory=dict, metadata={"doc": "path -> new key (in place) or new path"}
    )

    def __post_init__(self) -> None:
        for i, p in enumerate(self.allow or ()):
            path = _parse_path(f"allow[{i}]", p)
            if path.has_wildcard or not path.segments:
                raise Invalid(f"allow[{i}]", "allow paths name fields, without wildcards")
        for i, p in enumerate(self.deny):
            if not _parse_path(f"deny[{i}]", p).segments:
                raise Invalid(f"deny[{i}]", "cannot deny the whole answer")
        for src, dst in self.rename.items():
            source = _parse_path(f"rename.{src}", src)
            target = _parse_path(f"rename.{src}", dst)
            try:
                source.check_rename(target)
            except JsonPathError as e:
                raise Invalid(f"rename.{src}", str(e)) from None


@dataclass(frozen=True)
class CallConfig:
    name: str = field(
        metadata={
            "doc": "the call's name: its key in the answer, and how "
            "other calls' templates refer to its answer"
        }
    )
    upstream: str = field(metadata={"doc": "the [upstreams.NAME] to call"})
    path: str = field(metadata={"doc": 'request target template, e.g. "/users/{path.id}"'})
    method: str = "GET"
    timeout: Duration | None = field(
        default=None, metadata={"doc": "this call's deadline, from when it starts"}
    )
    required: bool = field(
        default=True, metadata={"doc": "a failure fails the whole request (502/504)"}
    )
    forward_headers: list[str] = field(
        default_factory=list,
        metadata={"doc": "client headers passed to this backend (Authorization only if listed)"},
    )
    headers: dict[str, str] = field(
        default_factory=dict, metadata={"doc": "extra request headers: name -> template"}
    )
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    extract: str | None = field(
        default=None, metadata={"doc": 'dotted path of the part of the answer to use ("data")'}
    )
    flatten: bool = field(default=False, metadata={"doc": "an array of arrays becomes one array"})
    key: str | None = field(
        default=None, metadata={"doc": "key in the composed answer (default: the name)"}
    )
    include: bool = field(default=True, metadata={"doc": "false: only other calls use this answer"})
    # Backend answers composed in memory: 1 MiB matches [server] max_buffered_body.
    max_body: ByteSize = field(default=ByteSize(1024 * 1024))

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise Invalid("name", f'expected a name like "user_orders", got {self.name!r}')
        if self.name in REQUEST_ROOTS:
            raise Invalid("name", f"{self.name!r} is reserved for request values in templates")
        if not _METHOD_RE.fullmatch(self.method):
            raise Invalid("method", f"expected an upper-case method, got {self.method!r}")
        if not self.path.startswith("/"):
            raise Invalid("path", 'must start with "/"')
        if self.timeout is not None and self.timeout <= 0:
            raise Invalid("timeout", "must be positive")
        for i, name in enumerate(self.forward_headers):
            _check_header_name(f"forward_headers[{i}]", name)
        for name in self.headers:
            _check_header_name(f"headers.{name}", name)
        if self.extract is not None:
            _parse_path("extract", self.extract)
        if self.key == PARTIAL_FIELD:
            raise Invalid("key", f"{PARTIAL_FIELD!r} is reserved for the partial list")

    @property
    def output_key(self) -> str:
        return self.key if self.key is not None else self.name


@dataclass(frozen=True)
class AggregateConfig:
    calls: list[CallConfig] = field(metadata={"doc": "the backend calls ([[...calls]])"})
    # A BFF answer that takes longer than this is worse than a fast error.
    timeout: Duration = field(
        default=Duration(5.0), metadata={"doc": "overall deadline for all calls"}
    )
    merge: Literal["keys", "top-level"] = field(
        default="keys",
        metadata={"doc": '"keys": each answer under its key; "top-level": objects merged'},
    )

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise Invalid("timeout", "must be positive")
        if not self.calls:
            raise Invalid("calls", "at least one call is needed")
        index: dict[str, int] = {}
        keys: dict[str, int] = {}
        for i, call in enumerate(self.calls):
            if call.name in index:
                raise Invalid(f"calls[{i}].name", f"duplicate call name {call.name!r}")
            index[call.name] = i
            if call.include and self.merge == "keys":
                if call.output_key in keys:
                    raise Invalid(f"calls[{i}].key", f"key {call.output_key!r} is used twice")
                keys[call.output_key] = i
        deps = {
            call.name: _call_dependencies(call, f"calls[{i}]", index)
            for i, call in enumerate(self.calls)
        }
        for i, call in enumerate(self.calls):
            for dep in deps[call.name]:
                if call.required and not self.calls[index[dep]].required:
                    raise Invalid(
                        f"calls[{i}].required",
                        f"required call {call.name!r} depends on optional call {dep!r}; "
                        "make both required or this one optional",
                    )
        cycle = _find_cycle(deps)
        if cycle is not None:
            raise Invalid(f"calls[{index[cycle[0]]}]", "dependency cycle: " + " -> ".join(cycle))


def _call_templates(
    call: CallConfig, roots: frozenset[str]
) -> tuple[Template, dict[str, Template]]:
    """The compiled path and header templates of ``call``; raises :class:`TemplateError`."""
    path = compile_template(call.path, roots)
    headers = {name: compile_template(v, roots) for name, v in call.headers.items()}
    return path, headers


def _call_dependencies(call: CallConfig, key: str, index: Mapping[str, int]) -> list[str]:
    roots = REQUEST_ROOTS | frozenset(index)
    try:
        path = compile_template(call.path, roots)
    except TemplateError as e:
        raise Invalid(f"{key}.path", str(e)) from None
    refs = list(path.refs)
    for name, value in call.headers.items():
        try:
            refs.extend(compile_template(value, roots).refs)
        except TemplateError as e:
            raise Invalid(f"{key}.headers.{name}", str(e)) from None
    return list(dict.fromkeys(r.root for r in refs if r.root in index))


def _find_cycle(deps: Mapping[str, list[str]]) -> list[str] | None:
    """A dependency cycle as a list of names (first == last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for dep in deps[name]:
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)) is not None:
                return found
        stack.pop()
        state[name] = 2
        return None

    for name in deps:
        if name not in state and (found := visit(name)) is not None:
            return found
    return None


# -- compiled plan ---------------------------------------------------------------------


class _Fields:
    __slots__ = ("allow", "deny", "rename")

    def __init__(self, config: FieldsConfig) -> None:
        self.allow = (
            tuple(JsonPath.parse(p) for p in config.allow) if config.allow is not None else None
        )
        self.deny = tuple(JsonPath.parse(p) for p in config.deny)
        self.rename = tuple(
            (JsonPath.parse(s), JsonPath.parse(d)) for s, d in config.rename.items()
        )

    def shape(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self._shape_object(v) if isinstance(v, dict) else v for v in value]
        if isinstance(value, dict):
            return self._shape_object(value)
        return value

    def _shape_object(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.allow is not None:
            kept: dict[str, Any] = {}
            for path in self.allow:
                v = path.get(obj)
                if v is not MISSING:
                    path.set(kept, v)
            obj = kept
        for path in self.deny:
            path.remove(obj)
        for source, target in self.rename:
            source.rename(obj, target)
        return obj


@dataclass(frozen=True, slots=True)
class _Failure:
    timed_out: bool
    detail: str
    # A value the client's request lacks (no default): its fault, a 400 when required.
    request_value: bool = False


class _CallPlan:
    """One call, compiled: templates, header lists, shaping."""

    def __init__(self, config: CallConfig, roots: frozenset[str], deps: list[str]) -> None:
        self.config = config
        self.name = config.name
        self.required = config.required
        self.deps = tuple(deps)
        self.method = config.method.encode()
        self.path, header_templates = _call_templates(config, roots)
        self.headers = tuple((n.lower().encode(), t) for n, t in header_templates.items())
        self.forward = tuple(n.lower().encode() for n in config.forward_headers)
        self.fields = _Fields(config.fields)
        self.extract = JsonPath.parse(config.extract) if config.extract is not None else None

    def target(self, lookup: Lookup) -> bytes:
        """The request target; values are percent-encoded. Raises :class:`MissingValue`,
        and :class:`_CallFailed` when values made a ``.`` or ``..`` segment."""
        target = self.path.render(lookup, escape=_escape_value)
        # quote() leaves "." alone, and an upstream decodes %2E before it removes dot
        # segments (RFC 3986 6.2.2): a value of ".." would climb out of its segment.
        if "." in target and any(
            unquote(seg) in _DOT_SEGMENTS for seg in target.partition("?")[0].split("/")
        ):
            raise _CallFailed("a request value made a dot segment in the call's path")
        return target.encode("ascii")

    def request_headers(self, exchange: Exchange, lookup: Lookup) -> Headers:
        items: list[tuple[bytes, bytes]] = [
            (b"accept", b"application/json"),
            (b"x-request-id", exchange.request_id.encode()),
        ]
        client_headers = exchange.request.headers
        for name in self.forward:
            values = client_headers.get_all(name)
            if values and name == b"accept":
                items = [(n, v) for n, v in items if n != b"accept"]
            items.extend((name, v) for v in values)
        headers = Headers(items)
        for name, template in self.headers:
            value = _CTL_RE.sub("", template.render(lookup))
            headers.set(name, value.encode("utf-8", "surrogateescape"))
        return headers

    def shape(self, answer: Any) -> Any:
        value = answer
        if self.extract is not None:
            if self.extract.has_wildcard:
                value = self.extract.find(value)
            else:
                value = self.extract.get(value, None)
        if self.config.flatten and isinstance(value, list):
            flat: list[Any] = []
            for item in value:
                if isinstance(item, list):
                    flat.extend(item)
                else:
                    flat.append(item)
            value = flat
        return self.fields.shape(value)


_DOT_SEGMENTS = frozenset({".", ".."})


def _escape_value(text: str) -> str:
    # (A header's bytes that are no UTF-8 come as surrogates: escaped as those bytes.)
    return quote(text.encode("utf-8", "surrogateescape"), safe="")


class _CallFailed(Exception):
    def __init__(self, detail: str, timed_out: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.timed_out = timed_out


class _Run:
    """The state of one aggregated request."""

    def __init__(self, plans: tuple[_CallPlan, ...], exchange: Exchange) -> None:
        self.exchange = exchange
        self.results: dict[str, Any] = {}
        self.failures: dict[str, _Failure] = {}
        self.done = {p.name: trio.Event() for p in plans}
        self.fatal: tuple[str, _Failure] | None = None
        self._request_lookup = exchange_lookup(exchange)

    def lookup(self, ref: Ref) -> Any:
        if ref.root in self.done:
            answer = self.results.get(ref.root, MISSING)
            if answer is MISSING or ref.json_path is None:
                return MISSING
            return ref.json_path.get(answer)
        if ref.root == "consumer" and self.exchange.identity is None:
            return MISSING  # an anonymous caller is no consumer, not the consumer ""
        # A request value that is missing, without a default, fails the call: the
        # empty string would send "/orders?user_id=" to a backend that may read it as
        # "every user's". ``{ref|}`` asks for the empty string.
        return self._request_lookup(ref)


class Aggregate(Filter):
    """Compose one JSON answer from several backend calls; see the module docstring."""

    name = "aggregate"
    stage = Stage.TERMINAL
    Config = AggregateConfig

    def __init__(self, config: AggregateConfig, context: FilterContext) -> None:
        super().__init__(config, context)
        self.config: AggregateConfig = config
        if context.upstreams:  # (empty: built outside a gateway's config, as in tests)
            for i, c in enumerate(config.calls):
                if c.upstream not in context.upstreams:
                    raise Invalid(f"calls[{i}].upstream", f"no upstream named {c.upstream!r}")
        # The upstreams this filter calls itself: the engine's identity hygiene looks at
        # them as at a route's own upstream.
        self.upstreams_called = frozenset(c.upstream for c in config.calls)
        index = {c.name: i for i, c in enumerate(config.calls)}
        roots = REQUEST_ROOTS | frozenset(index)
        self._plans = tuple(
            _CallPlan(c, roots, _call_dependencies(c, f"calls[{i}]", index))
            for i, c in enumerate(config.calls)
        )

    async def on_request(self, exchange: Exchange) -> Response:
        run = _Run(self._plans, exchange)
        try:
            with trio.move_on_after(self.config.timeout) as deadline:
                async with trio.open_nursery() as nursery:
                    for plan in self._plans:
                        nursery.start_soon(self._run_call, run, plan, nursery.cancel_scope)
        except BaseExceptionGroup as group:
            gone, rest = group.split(ClientGone)
            if gone is None:
                raise
            if rest is not None:  # cut from outside meanwhile (a shutdown): that wins
                raise rest from None
            # The client closed its connection while a call waited: the calls are let
            # go (the others cancelled with the nursery), as a proxied call is.
            raise ClientGone() from None
        if run.fatal is not None:
            name, failure = run.fatal
            message = f"required call {name!r} failed: {failure.detail}"
            if failure.request_value:
                raise BadRequest(f"required call {name!r} needs a value: {failure.detail}")
            raise UpstreamTimeout(message) if failure.timed_out else BadGateway(message)
        if deadline.cancelled_caught:
            for plan in self._plans:
                if plan.name in run.results or plan.name in run.failures:
                    continue
                self._count(exchange, plan, "timeout")
                if plan.required:
                    raise UpstreamTimeout(
                        f"required call {plan.name!r} did not finish within the aggregate timeout"
                    )
                run.failures[plan.name] = _Failure(True, "overall deadline")
        return self._compose(run)

    async def _run_call(self, run: _Run, plan: _CallPlan, siblings: trio.CancelScope) -> None:
        for dep in plan.deps:
            await run.done[dep].wait()
        failure: _Failure | None = None
        try:
            failed_deps = [d for d in plan.deps if d in run.failures]
            if failed_deps:
                failure = _Failure(False, f"depends on failed call {failed_deps[0]!r}")
                self._count(run.exchange, plan, "skipped")
            else:
                failure = await self._call(run, plan)
                self._count(
                    run.exchange,
                    plan,
                    "ok" if failure is None else ("timeout" if failure.timed_out else "error"),
                )
            if failure is not None:
                # Recorded before ``done`` is set, so dependents see it when they wake.
                run.failures[plan.name] = failure
                if plan.required and run.fatal is None:
                    run.fatal = (plan.name, failure)
                    siblings.cancel()
        finally:
            # Set even when cancelled: a dependent still waiting is being cancelled too.
            run.done[plan.name].set()

    async def _call(self, run: _Run, plan: _CallPlan) -> _Failure | None:
        """Make one call and record its answer; returns the failure, if any."""
        exchange = run.exchange
        timeout = plan.config.timeout
        deadline = trio.current_time() + timeout if timeout is not None else float("inf")
        with trio.CancelScope(deadline=deadline) as scope:
            try:
                target = plan.target(run.lookup)
                headers = plan.request_headers(exchange, run.lookup)
                call = UpstreamCall(
                    upstream=plan.config.upstream,
                    method=plan.method,
                    target=target,
                    headers=headers,
                    timeout=timeout,
                )
                answer = await self._fetch(exchange, call, plan.config.max_body)
            except MissingValue as e:
                return _Failure(False, str(e), request_value=e.ref.root in REQUEST_ROOTS)
            except _CallFailed as e:
                return _Failure(e.timed_out, e.detail)
            except UpstreamTimeout as e:
                return _Failure(True, e.message)
            except GatewayError as e:
                return _Failure(False, e.message)
            except ClientGone:
                raise  # nobody to answer: the whole aggregate ends
            except Exception as e:
                # Anything the upstream layer did not convert: the call failed, the
                # request need not (an optional call is just left out).
                self.context.logger.warning(
                    "aggregate call %r of request %s failed",
                    plan.name,
                    exchange.request_id,
                    exc_info=True,
                )
                return _Failure(False, type(e).__name__)
        if scope.cancelled_caught:
            return _Failure(True, f"no answer within {timeout:g}s")
        run.results[plan.name] = answer
        return None

    async def _fetch(self, exchange: Exchange, call: UpstreamCall, max_body: int) -> Any:
        """The JSON answer of ``call``; raises :class:`_CallFailed` or the upstream errors."""
        response = await exchange.call_upstream(call)
        complete = False
        try:
            if not 200 <= response.status < 300:
                raise _CallFailed(f"answered {response.status}")
            if response.body is not None:
                body = response.body
            else:
                body = await _read_body(response, max_body)
            complete = True
        finally:
            if not complete:
                with trio.CancelScope(deadline=trio.current_time() + _CLOSE_GRACE, shield=True):
                    await response.aclose()
        if len(body) > max_body:
            raise _CallFailed(f"answer larger than {max_body} bytes")
        if not body.strip():
            return None
        try:
            return load_json(body)  # no NaN, no 1e999, no RecursionError (RFC 8259)
        except NotJson:
            raise _CallFailed("answer is not valid JSON") from None

    def _compose(self, run: _Run) -> Response:
        doc: dict[str, Any] = {}
        for plan in self._plans:
            if not plan.config.include or plan.name not in run.results:
                continue
            value = plan.shape(run.results[plan.name])
            if self.config.merge == "top-level" and isinstance(value, dict):
                doc.update(value)
                # Reserved: a backend's own "_partial" would tell the client that calls
                # were left out when none was (or hide which).
                doc.pop(PARTIAL_FIELD, None)
            else:
                doc[plan.config.output_key] = value
        partial = [p.name for p in self._plans if p.name in run.failures]
        headers = [(b"content-type", b"application/json")]
        if partial:
            doc[PARTIAL_FIELD] = partial
            headers.append((PARTIAL_HEADER, ", ".join(partial).encode()))
        try:
            body = dump_json(doc)  # parsed strictly and shaped: JSON, unless too deep now
        except NotJson as e:  # an answer just under the parser's depth, nested further
            raise BadGateway(f"the composed answer cannot be written as JSON: {e}") from None
        headers.append((b"content-length", str(len(body)).encode()))
        return Response(status=200, headers=Headers(headers), body=body)

    def _count(self, exchange: Exchange, plan: _CallPlan, outcome: str) -> None:
        route = exchange.route.name if exchange.route is not None else ""
        CALLS.inc(route=route, call=plan.name, outcome=outcome)


async def _read_body(response: Response, limit: int) -> bytes:
    """The whole streamed body; raises :class:`_CallFailed` once it exceeds ``limit``."""
    stream = response.stream
    if stream is None:
        return b""
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise _CallFailed(f"answer larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@hookimpl
def filtergate_filters() -> list[type[Filter]]:
    return [Aggregate]
