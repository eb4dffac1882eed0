"""Filter types, stages, and the per-route chain compiled once at config load.

A filter type is a small class::

    class AddHeader(Filter):
        name, stage = "add-header", Stage.TRANSFORM
        Config = AddHeaderConfig            # a dataclass: the config schema

        def on_request(self, exchange: Exchange) -> None:
            exchange.request.headers.set("x-hello", self.config.value)

Phases (each optional, sync or async; which is which is decided once here, not per call):

``on_request(exchange) -> Response | None``
    Request side, in stage order. Returning a response (or setting
    ``exchange.response``) answers the request: the remaining request phases and the
    upstream call are skipped. Raising a :class:`~engine.errors.GatewayError` answers
    with the gateway's error response.
``on_response(exchange, response) -> None``
    Response side, in reverse order, for every filter whose request phase ran (so a
    401 or 429 made by a filter still passes through the filters before it). Changes
    ``response`` in place.
``around_upstream(exchange, call, call_next) -> Response``
    Wraps every upstream call, proxied or made by a filter through
    ``exchange.call_upstream``: the place for circuit breaking and retries.
``on_log(exchange) -> None``
    After the last byte was sent, and for an exchange that did not end whole
    (``exchange.aborted``: the client left first, or the response was cut off);
    exceptions are logged, never seen by the client.

Lifecycle hooks, also optional: ``async setup()`` is awaited before the gateway serves
with this config (e.g. a first JWKS fetch); ``async background()`` runs for as long as
the instance is in use (e.g. refreshing keys) and is cancelled when a reload drops it.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from engine.exchange import Exchange, Response, UpstreamCall

__all__ = [
    "FILTER_API_VERSION",
    "Chain",
    "EmptyConfig",
    "Filter",
    "FilterContext",
    "Phase",
    "Stage",
    "compile_chain",
]

log = logging.getLogger("filtergate.chain")

FILTER_API_VERSION = 1
"""The filter API this engine implements; a filter type declares the one it was written for."""


class Stage(enum.IntEnum):
    """Where a filter type runs. The engine sorts by stage; config order breaks ties."""

    EDGE = 10
    AUTHENTICATE = 20
    LIMIT = 30
    TRANSFORM = 40
    TERMINAL = 50


@dataclass(frozen=True)
class EmptyConfig:
    """The config schema of a filter type that takes no options."""


class FilterContext:
    """What the engine gives a filter instance when it is made.

    ``scope`` is ``"global"`` for an instance shared by routes using the plugin's global
    config, else ``"route:NAME"``. ``logger`` is the instance's logger. ``upstreams``
    names the configured upstreams, so a filter that calls them can check its config;
    ``request_id_header`` is ``[server] request_id_header``. A filter's ``__init__`` may
    raise :class:`engine.schema.Invalid`: the engine reports it at the filter's config path.
    """

    def __init__(
        self,
        filter_name: str,
        scope: str,
        *,
        upstreams: frozenset[str] = frozenset(),
        request_id_header: str = "x-request-id",
    ) -> None:
        self.filter_name = filter_name
        self.scope = scope
        self.upstreams = upstreams
        self.request_id_header = request_id_header
        self.logger = logging.getLogger(f"filtergate.plugins.{filter_name}")


class Filter:
    """Base class for filter types (optional: any class with these attributes works).

    Subclasses set ``name``, ``stage`` and ``Config``; ``api_version`` is the filter API
    they were written for. ``needs_request_body`` / ``needs_response_body`` ask the engine
    to buffer the whole body (up to ``[server] max_buffered_body``) before this filter's
    phase runs; when the body is larger, ``request.body`` / ``response.body`` stay
    ``None`` and the body keeps streaming.
    """

    name: ClassVar[str]
    stage: ClassVar[Stage]
    Config: ClassVar[type[Any]] = EmptyConfig
    api_version: ClassVar[int] = FILTER_API_VERSION
    needs_request_body: ClassVar[bool] = False
    needs_response_body: ClassVar[bool] = False
    # Headers (lowercase bytes) this filter reads credentials from: on the routes where
    # it runs, other filters' identity-header stripping leaves them alone.
    credential_headers: frozenset[bytes] = frozenset()
    # This filter answers CORS preflights (``OPTIONS`` with ``Origin`` and
    # ``Access-Control-Request-Method``): on the routes where it runs, the engine routes
    # a preflight by the method it announces, so a route that lists only GET gets the
    # preflights of its GETs instead of a 405.
    handles_preflight: ClassVar[bool] = False

    def __init__(self, config: Any, context: FilterContext) -> None:
        self.config = config
        self.context = context


PhaseFn = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class Phase:
    """One bound phase method and whether it must be awaited."""

    fn: PhaseFn
    is_async: bool
    filter: Any


def _phase(instance: Any, name: str) -> Phase | None:
    fn = getattr(instance, name, None)
    if fn is None:
        return None
    is_async = inspect.iscoroutinefunction(fn)
    if name == "around_upstream" and not is_async:
        raise TypeError(f"filter {instance.name!r}: around_upstream must be async")
    return Phase(fn, is_async, instance)


CallNext = Callable[[UpstreamCall], Awaitable[Response]]


@dataclass(slots=True)
class Chain:
    """The compiled filter chain of one route; lists built once, run per request."""

    filters: list[Any]
    request: list[Phase]
    response: list[Phase]  # indexed like ``request`` positions: see ``response_for``
    around: list[Phase]
    log: list[Phase]
    request_body_at: int | None  # index into ``filters`` of the first body-needing filter
    needs_response_body: bool
    # Every filter's ``credential_headers``: the exchange carries them (see Exchange).
    credential_headers: frozenset[bytes] = frozenset()
    # A filter answers CORS preflights (see Filter.handles_preflight).
    handles_preflight: bool = False
    _response_by_depth: list[list[Phase]] = dataclasses.field(default_factory=list)
    # ``request`` as (depth, fn, is_async): depth counts the filters up to and including
    # the phase's own, so the runner need not walk the filters that have no request side.
    _request_steps: list[tuple[int, PhaseFn, bool]] = dataclasses.field(default_factory=list)
    # Every request (response) phase is a plain function and no filter needs the request
    # body buffered: the engine runs that side with a plain call, no coroutine made.
    sync_request: bool = False
    sync_response: bool = False

    def response_for(self, depth: int) -> list[Phase]:
        """Response phases, reversed, of the first ``depth`` filters of the chain."""
        return self._response_by_depth[depth]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.filters]


def chain_notes(chain: Chain) -> list[str]:
    """What in ``chain`` cannot work as configured, for ``check`` and the log at load.

    A filter told to step aside for a caller an earlier filter authenticated
    (``skip_if_authenticated``) with no authenticating filter before it never steps
    aside: the route then requires its credential too (it fails closed).
    """
    notes = []
    for i, f in enumerate(chain.filters):
        config = getattr(f, "config", None)
        authenticated = any(g.stage is Stage.AUTHENTICATE for g in chain.filters[:i])
        if getattr(config, "skip_if_authenticated", False) is True and not authenticated:
            notes.append(
                f"{f.name}: skip_if_authenticated never applies, no authentication runs "
                "before it (put allow_anonymous on an auth plugin that runs first)"
            )
        request_json = getattr(getattr(config, "request", None), "json", None)
        if (
            f.name == "transform"
            and request_json is not None
            and (request_json.remove or request_json.rename or request_json.set or request_json.add)
            and not request_json.mandatory
        ):
            notes.append(
                "transform: the client can make the request body's JSON edits skip (a body "
                "too large, compressed or not JSON passes on unedited); set "
                "request.json.mandatory = true if the upstream relies on them"
            )
        if f.name == "rate-limit" and getattr(config, "groups", None) and not authenticated:
            notes.append(
                "rate-limit: groups never apply, no authentication runs before it to give "
                "the caller its groups (every caller gets the default limits)"
            )
    return notes


def compile_chain(filters: list[Any]) -> Chain:
    """A :class:`Chain` for filter instances, sorted by stage (stable: ties keep order)."""
    ordered = sorted(filters, key=lambda f: int(f.stage))
    request = [p for f in ordered if (p := _phase(f, "on_request"))]
    around = [p for f in ordered if (p := _phase(f, "around_upstream"))]
    log_phases = [p for f in ordered if (p := _phase(f, "on_log"))]
    by_depth: list[list[Phase]] = []
    for depth in range(len(ordered) + 1):
        phases = [p for f in ordered[:depth] if (p := _phase(f, "on_response"))]
        by_depth.append(list(reversed(phases)))
    body_at = next(
        (i for i, f in enumerate(ordered) if getattr(f, "needs_request_body", False)), None
    )
    steps: list[tuple[int, PhaseFn, bool]] = []
    for i, f in enumerate(ordered):
        if len(steps) < len(request) and request[len(steps)].filter is f:
            p = request[len(steps)]
            steps.append((i + 1, p.fn, p.is_async))
    return Chain(
        filters=ordered,
        request=request,
        response=by_depth[-1],
        around=around,
        log=log_phases,
        request_body_at=body_at,
        needs_response_body=any(getattr(f, "needs_response_body", False) for f in ordered),
        credential_headers=frozenset().union(
            *(getattr(f, "credential_headers", ()) for f in ordered)
        ),
        handles_preflight=any(getattr(f, "handles_preflight", False) for f in ordered),
        _response_by_depth=by_depth,
        _request_steps=steps,
        sync_request=body_at is None and not any(p.is_async for p in request),
        sync_response=not any(p.is_async for p in by_depth[-1]),
    )


async def run_request_phases(
    chain: Chain,
    exchange: Exchange,
    buffer_request_body: Callable[[], Awaitable[None]] | None = None,
) -> tuple[Response | None, int]:
    """Run the request side; returns ``(answer or None, depth reached)``.

    ``depth`` counts the filters whose request side ran (including one that answered
    or raised), so the caller runs ``chain.response_for(depth)``. Exceptions propagate
    with ``exchange.stash``-independent depth available as ``exc.filter_depth``.
    ``buffer_request_body`` is awaited once the filters before the first one that needs
    the body have run (``chain.request_body_at``), unless one of them answered.
    """
    # The filter index before which the body is buffered, while it still is to be.
    body_at = chain.request_body_at if buffer_request_body is not None else None
    for depth, fn, is_async in chain._request_steps:
        if body_at is not None and depth > body_at:
            await _buffer_body(buffer_request_body, body_at + 1)
            body_at = None
        try:
            r = fn(exchange)
            if is_async:
                r = await r
        except BaseException as e:
            e.filter_depth = depth  # type: ignore[attr-defined]
            raise
        if r is None:
            r = exchange.response
        if r is not None:
            return r, depth
    if body_at is not None:
        await _buffer_body(buffer_request_body, body_at + 1)
    return None, len(chain.filters)


def run_sync_request_phases(chain: Chain, exchange: Exchange) -> tuple[Response | None, int]:
    """:func:`run_request_phases` of a chain whose request phases are all plain
    functions and buffer no body (``chain.sync_request``), without a coroutine."""
    for depth, fn, _ in chain._request_steps:
        try:
            r = fn(exchange)
        except BaseException as e:
            e.filter_depth = depth  # type: ignore[attr-defined]
            raise
        if r is None:
            r = exchange.response
        if r is not None:
            return r, depth
    return None, len(chain.filters)


async def _buffer_body(buffer: Callable[[], Awaitable[None]] | None, depth: int) -> None:
    assert buffer is not None
    try:
        await buffer()
    except BaseException as e:
        e.filter_depth = depth  # type: ignore[attr-defined]
        raise


async def run_response_phases(phases: list[Phase], exchange: Exchange, response: Response) -> None:
    """Run ``on_response`` phases (already reversed) on ``response``.

    An exception carries ``phases_left``: the phases after the one that raised, which
    the error response still goes through (the raising filter does not see it twice).
    """
    for i, phase in enumerate(phases):
        try:
            r = phase.fn(exchange, response)
            if phase.is_async:
                await r
        except BaseException as e:
            e.phases_left = phases[i + 1 :]  # type: ignore[attr-defined]
            raise


def run_sync_response_phases(phases: list[Phase], exchange: Exchange, response: Response) -> None:
    """:func:`run_response_phases` of plain-function phases (``chain.sync_response``)."""
    for i, phase in enumerate(phases):
        try:
            phase.fn(exchange, response)
        except BaseException as e:
            e.phases_left = phases[i + 1 :]  # type: ignore[attr-defined]
            raise


async def run_log_phases(chain: Chain, exchange: Exchange) -> None:
    """Run the ``on_log`` phases in order; an exception is logged and goes no further."""
    for phase in chain.log:
        try:
            r = phase.fn(exchange)
            if phase.is_async:
                await r
        except Exception:
            log.exception("on_log of filter %r failed", phase.filter.name)


def wrap_upstream(
    phases: list[Phase], exchange: Exchange, send: CallNext, start: int = 0
) -> CallNext:
    """``send`` wrapped by the ``around_upstream`` phases from index ``start`` on.

    Made per call, so it is cheap: each phase is bound by a plain function that hands
    back the phase's own coroutine (no wrapper coroutine around it), passing
    ``call_next`` by position, so any parameter name or shape works.
    """
    call_next = send
    for i in range(len(phases) - 1, start - 1, -1):
        call_next = _bind(phases[i].fn, exchange, call_next)
    return call_next


def _bind(fn: PhaseFn, exchange: Exchange, inner: CallNext) -> CallNext:
    # A closure, not functools.partial(fn, exchange, call_next=inner): a partial with a
    # keyword copies its keyword dict and goes through the generic call path per call.
    # (Its parameter is named as the engine's own send names it: ``call_next(call=...)``
    # works whichever phases are inside.)
    def bound(call: UpstreamCall) -> Awaitable[Response]:
        coro: Awaitable[Response] = fn(exchange, call, inner)
        return coro

    return bound
