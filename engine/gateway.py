"""A loaded config, compiled: router, per-route chains, upstream pools.

:func:`compile_runtime` does all the work that does not depend on a request: plugin
configs are validated, filter instances made, chains sorted by stage, routes indexed.
A reload compiles a new :class:`Runtime` beside the old one; filter instances and pools
whose config did not change are carried over, so their state (limiter counters, breaker
states, key sets, warm connections) survives.

Plugin config merge rule: ``[plugins.NAME]`` enables NAME on every route (unless it
says ``enabled = false``, which only sets defaults); ``[routes.plugins.NAME]`` enables
it on one route, its keys override the global ones key by key, and ``enabled = false``
switches it off for that route. A route whose effective config equals the global one
shares the global instance (and its state); one with overrides gets its own.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from engine.accesslog import AccessLog
from engine.chain import Chain, FilterContext, compile_chain, wrap_upstream
from engine.config import Config, RouteConfig
from engine.errors import BadGateway
from engine.exchange import Exchange, Response, UpstreamCall
from engine.metrics import BoundHistogram
from engine.plugins import Registry
from engine.router import Router, allowed_methods
from engine.schema import ConfigError, Invalid, build, check_keys
from engine.upstream import Pool

__all__ = [
    "RouteRuntime",
    "Runtime",
    "compile_runtime",
    "effective_plugin_configs",
    "route_notes",
]

log = logging.getLogger("filtergate.gateway")


@dataclass(slots=True)
class RouteRuntime:
    """Everything the engine needs per request for one route, built at load."""

    config: RouteConfig
    chain: Chain
    pool: Pool | None
    max_body_size: int
    rewrite: list[str | int] | None  # literal parts, and path segment indexes (captures)
    connect_timeout: float | None
    read_timeout: float | None
    timeout: float | None
    host_header: bytes | None
    pools: dict[str, Pool]
    allow: tuple[str, ...]  # its Allow header (405, OPTIONS): HEAD with GET, all if none
    # On a route with no auth filter whose upstream an authenticated route also reaches:
    # the identity headers those auth filters strip (see _shared_upstream_hygiene).
    strip_identity: Callable[[bytes], bool] | None = None
    # The protocols a client may switch to here (``upgrades``), lower-case.
    upgrades: frozenset[bytes] = frozenset()
    # The request-duration series of this route by status class (index status // 100),
    # bound on first use: a class that never occurs renders nothing.
    latency: list[BoundHistogram | None] = field(default_factory=lambda: [None] * 10)

    def send_proxied(self, call: UpstreamCall) -> Awaitable[Response]:
        """The proxied call's last step, under the route's around filters: the pool the
        call names (a filter may have changed it), with the route's timeouts.

        A plain function handing back the pool's coroutine: the innermost around filter
        awaits it directly, one coroutine fewer in every proxied call's stack.
        """
        pool = self.pools.get(call.upstream, self.pool)
        assert pool is not None
        return pool.send(call, connect_timeout=self.connect_timeout, read_timeout=self.read_timeout)

    async def call_upstream(self, exchange: Exchange, call: UpstreamCall) -> Response:
        """A call a filter makes (``exchange.call_upstream``): around filters, then pool."""
        pool = self.pools.get(call.upstream)
        if pool is None:
            raise BadGateway(f"no upstream named {call.upstream!r}")
        if call.client_gone is None:  # let go when the client goes, as a proxied call
            call.client_gone = exchange.client_gone
        pools = self.pools

        def send(c: UpstreamCall) -> Awaitable[Response]:
            return pools.get(c.upstream, pool).send(c)

        if self.chain.around:
            return await wrap_upstream(self.chain.around, exchange, send)(call)
        return await send(call)


@dataclass(slots=True)
class Runtime:
    """One config, compiled. Replaced as a whole on reload."""

    config: Config
    registry: Registry
    router: Router[RouteRuntime]
    routes: list[RouteRuntime]
    pools: dict[str, Pool]
    instances: list[tuple[str, str, Any, Any]]  # (filter name, scope, config, instance)
    trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    router_needs_query: bool
    via_header: bytes = b""
    via_10: bytes = b""  # the Via of an HTTP/1.0 request (RFC 9110 7.6.3)
    any_absolute_form: bool = False
    # A route's filter answers CORS preflights: OPTIONS preflights are routed by the
    # method they announce (see Filter.handles_preflight).
    any_preflight: bool = False
    rid_header: bytes = b""
    access_log: AccessLog | None = None
    _trusted_cache: dict[str, bool] = field(default_factory=dict)

    def is_trusted(self, address: str) -> bool:
        """Whether ``address`` is in ``[server] trusted_proxies``."""
        if not self.trusted:
            return False
        hit = self._trusted_cache.get(address)
        if hit is None:
            try:
                ip = ipaddress.ip_address(address)
                hit = any(ip in net for net in self.trusted)
            except ValueError:
                hit = False
            if len(self._trusted_cache) > 10_000:
                self._trusted_cache.clear()
            self._trusted_cache[address] = hit
        return hit


def _compile_rewrite(route: RouteConfig, path: str) -> list[str | int] | None:
    """A route's ``rewrite`` as literal text and, for each ``{name}``, the index of the
    path segment that captures it (``path`` is the route's key path, for the error).

    The capture is forwarded as the client's segment is in the canonical path, still
    percent-encoded: decoded, ``%3F`` would start a query and ``%252e`` become ``%2e``
    (``.`` to the upstream), and the canonical path has no dot segments left."""
    template = route.rewrite
    if template is None:
        return None
    segments = route.pattern.split("/")[1:] if route.pattern != "/" else []
    index = {s[1:-1]: i for i, s in enumerate(segments) if s.startswith("{")}
    parts: list[str | int] = []
    pos = 0
    for m in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", template):
        if m.start() > pos:
            parts.append(template[pos : m.start()])
        if m.group(1) not in index:
            raise ConfigError(f"{path}.rewrite", f"{{{m.group(1)}}} is no capture of the path")
        parts.append(index[m.group(1)])
        pos = m.end()
    if pos < len(template):
        parts.append(template[pos:])
    return parts


def effective_plugin_configs(
    config: Config, route_index: int
) -> list[tuple[str, dict[str, Any], str, str]]:
    """``(name, effective table, scope, path)`` of each plugin enabled on a route.

    In config order: global plugins first, then the route's own. ``scope`` is
    ``"global"`` when the route uses the global table unchanged, else ``route:NAME``.
    """
    route = config.routes[route_index]
    out: list[tuple[str, dict[str, Any], str, str]] = []
    seen = set()
    for name, table in config.plugins.items():
        seen.add(name)
        base = {k: v for k, v in table.items() if k != "enabled"}
        enabled = table.get("enabled", True)
        override = route.plugins.get(name)
        if override is not None:
            enabled = override.get("enabled", True)
            changes = {k: v for k, v in override.items() if k != "enabled"}
            merged = {**base, **changes}
            if merged != base:
                if enabled:
                    out.append((name, merged, f"route:{route.name}", f"routes[{route_index}]"))
                continue
        if enabled:
            out.append((name, base, "global", ""))
    for name, table in route.plugins.items():
        if name in seen:
            continue
        if table.get("enabled", True):
            changes = {k: v for k, v in table.items() if k != "enabled"}
            out.append((name, changes, f"route:{route.name}", f"routes[{route_index}]"))
    return out


def _check_enabled_key(path: str, table: dict[str, Any]) -> None:
    if "enabled" in table and not isinstance(table["enabled"], bool):
        raise ConfigError(f"{path}.enabled", f"expected true or false, got {table['enabled']!r}")


def compile_runtime(config: Config, registry: Registry, previous: Runtime | None = None) -> Runtime:
    """Compile ``config``; raises :class:`ConfigError` naming the path of any problem."""
    old_instances = previous.instances if previous else []
    instances: list[tuple[str, str, Any, Any]] = []
    for name, table in config.plugins.items():
        _check_enabled_key(f"plugins.{name}", table)
        if registry.get(name) is None:
            raise ConfigError(f"plugins.{name}", _unknown_plugin(name, registry))
    for i, route in enumerate(config.routes):
        for name, table in route.plugins.items():
            _check_enabled_key(f"routes[{i}].plugins.{name}", table)
            if registry.get(name) is None:
                raise ConfigError(f"routes[{i}].plugins.{name}", _unknown_plugin(name, registry))

    # Pools: reuse the old pool when its upstream config is unchanged (warm connections,
    # health and ejection state survive a reload).
    pools: dict[str, Pool] = {}
    for name, ucfg in config.upstreams.items():
        old = previous.pools.get(name) if previous else None
        if old is not None and old.config == ucfg:
            pools[name] = old
            continue
        pools[name] = Pool(name, ucfg)

    routes: list[RouteRuntime] = []
    built: set[str] = set()  # plugins whose config some route built (and so checked)
    for i, route in enumerate(config.routes):
        filters = []
        for name, table, scope, route_path in effective_plugin_configs(config, i):
            built.add(name)
            info = registry.filters[name]
            cls = info.type
            cfg_path = f"{route_path}.plugins.{name}" if route_path else f"plugins.{name}"
            try:
                cfg = build(cls.Config, table, cfg_path)
            except ConfigError as e:
                if route_path and e.path.startswith(cfg_path + "."):
                    key = e.path[len(cfg_path) + 1 :].split(".")[0].split("[")[0]
                    # A missing key belongs to the route's table, where it is missing.
                    if key in config.plugins.get(name, {}) and key not in route.plugins.get(
                        name, {}
                    ):
                        # The bad key came from the global table: say so.
                        raise ConfigError(
                            f"plugins.{name}.{e.path[len(cfg_path) + 1 :]}", e.message
                        ) from None
                raise
            # Same filter, scope and (equal) config: the same instance, and its state.
            instance = _find_instance(instances, name, scope, cfg)
            if instance is None:
                instance = _find_instance(old_instances, name, scope, cfg)
                if instance is not None:
                    instances.append((name, scope, cfg, instance))
            if instance is None:
                context = FilterContext(
                    name,
                    scope,
                    upstreams=frozenset(config.upstreams),
                    request_id_header=config.server.request_id_header,
                )
                try:
                    instance = cls(cfg, context)
                except Invalid as e:
                    raise ConfigError(
                        f"{cfg_path}.{e.key}" if e.key else cfg_path, e.message
                    ) from None
                except Exception as e:  # a plugin's bug: named, exit 2, no traceback
                    raise ConfigError(
                        cfg_path, f"filter {name!r} failed to start: {type(e).__name__}: {e}"
                    ) from None
                instances.append((name, scope, cfg, instance))
            filters.append(instance)
        try:
            chain = compile_chain(filters)
        except TypeError as e:  # a filter type whose phases break the contract
            raise ConfigError(f"routes[{i}]", str(e)) from None
        has_terminal = any(int(f.stage) >= 50 for f in chain.filters)
        if route.upstream is None and not has_terminal:
            raise ConfigError(
                f"routes[{i}]", 'needs "upstream" (or a terminal plugin such as aggregate)'
            )
        pool = pools[route.upstream] if route.upstream else None
        host_header = None
        if pool is not None and pool.config.host_header:
            host_header = pool.config.host_header.encode()
        routes.append(
            RouteRuntime(
                config=route,
                chain=chain,
                pool=pool,
                max_body_size=route.max_body_size
                if route.max_body_size is not None
                else config.server.max_body_size,
                rewrite=_compile_rewrite(route, f"routes[{i}]"),
                connect_timeout=route.connect_timeout,
                read_timeout=route.read_timeout,
                timeout=route.timeout,
                host_header=host_header,
                pools=pools,
                allow=allowed_methods(route.methods),
                upgrades=frozenset(p.lower().encode() for p in route.upgrades),
            )
        )
    _shared_upstream_hygiene(routes)
    router = Router([(r.config, r) for r in routes])
    trusted = [ipaddress.ip_network(c, strict=False) for c in config.server.trusted_proxies]
    # A global table no route uses (no routes yet, or every route switches it off) is
    # still checked: check must not pass a file whose next route would fail to load.
    # A table switched off (with enabled = false) is checked for what it has: a typo
    # in it must not wait for the day a route turns it on. It may be partial (routes
    # complete a global one), so no required key is asked for.
    for name, table in config.plugins.items():
        base = {k: v for k, v in table.items() if k != "enabled"}
        if name not in built and table.get("enabled", True):
            build(registry.filters[name].type.Config, base, f"plugins.{name}")
        elif not table.get("enabled", True):
            check_keys(registry.filters[name].type.Config, base, f"plugins.{name}")
    for i, route in enumerate(config.routes):
        for name, table in route.plugins.items():
            if not table.get("enabled", True):
                changes = {k: v for k, v in table.items() if k != "enabled"}
                path = f"routes[{i}].plugins.{name}"
                check_keys(registry.filters[name].type.Config, changes, path)
    return Runtime(
        config=config,
        registry=registry,
        router=router,
        routes=routes,
        pools=pools,
        instances=instances,
        trusted=trusted,
        router_needs_query=any(r.query for r in config.routes),
        via_header=b"1.1 " + config.server.via.encode(),
        via_10=b"1.0 " + config.server.via.encode(),
        any_absolute_form=any(r.allow_absolute_form for r in config.routes),
        any_preflight=any(r.chain.handles_preflight for r in routes),
        rid_header=config.server.request_id_header.lower().encode(),
        access_log=_access_log(config, previous),
    )


def _access_log(config: Config, previous: Runtime | None) -> AccessLog | None:
    """The access log of ``config``: the previous one when its config did not change."""
    if config.access_log.path is None:
        return None
    old = previous.access_log if previous is not None else None
    if old is not None and old.config == config.access_log:
        return old
    return AccessLog(config.access_log)


def _shared_upstream_hygiene(routes: list[RouteRuntime]) -> None:
    """Identity headers are stripped on a route with no auth filter too, when it reaches
    a service an authenticated route reaches: that service trusts the ``X-User-Id`` its
    guarded route injects, and must not get a client's own from the open route beside
    it. A route reaches its upstream's targets and those of the upstreams its filters
    call (``upstreams_called``, e.g. aggregate's); two upstream names with a target in
    common are one service. (Auth filters say which headers they treat as identity:
    ``identity_headers``, a test on lowercase names.)"""
    if not routes:
        return
    pools = routes[0].pools

    def targets(route: RouteRuntime) -> set[str]:
        names = {route.config.upstream} if route.config.upstream else set()
        for f in route.chain.filters:
            names |= set(getattr(f, "upstreams_called", ()))
        return {t.address for n in names if (pool := pools.get(n)) for t in pool.targets}

    guarded: dict[str, list[Callable[[bytes], bool]]] = {}
    open_routes = []
    for route in routes:
        tests: list[Callable[[bytes], bool]] = [
            t for f in route.chain.filters if (t := getattr(f, "identity_headers", None))
        ]
        if not tests:
            open_routes.append(route)
        for address in targets(route) if tests else ():
            guarded.setdefault(address, []).extend(tests)
    for route in open_routes if guarded else ():
        # In order, once each.
        found = list(dict.fromkeys(t for a in targets(route) for t in guarded.get(a, ())))
        if found:
            route.strip_identity = found[0] if len(found) == 1 else _any_of(tuple(found))


def _any_of(tests: tuple[Callable[[bytes], bool], ...]) -> Callable[[bytes], bool]:
    def test(name: bytes) -> bool:
        return any(t(name) for t in tests)

    return test


def route_notes(runtime: Runtime) -> dict[str, list[str]]:
    """What in each route cannot work as configured, by route name, for ``check`` and
    the log at load: its chain's notes (:func:`engine.chain.chain_notes`), and a route
    that an earlier one takes every request of (same hosts, pattern and conditions,
    methods included), so that it never matches. One pass over the routes, grouped by
    that shape: 10,000 routes were 50 million comparisons."""
    from engine.chain import chain_notes

    notes: dict[str, list[str]] = {}
    seen: dict[tuple[object, ...], list[RouteConfig]] = {}
    for route in runtime.routes:
        rc = route.config
        found = chain_notes(route.chain)
        shape = _shape(rc)
        earlier = seen.setdefault(shape, [])
        shadow = next((e for e in earlier if _methods_cover(e, rc)), None)
        if shadow is not None:
            found.append(
                f"never matches: route {shadow.name!r} before it has the same hosts, "
                "path and conditions, and takes every request it would"
            )
        if found:
            notes[rc.name] = found
        earlier.append(rc)
    return notes


def _shape(rc: RouteConfig) -> tuple[object, ...]:
    raw = rc.pattern.rstrip("/") if rc.is_prefix else rc.pattern  # "/a/" is "/a"
    pattern = re.sub(r"\{[^}/]*\}", "{}", raw)  # captures match alike, whatever their name
    return (
        tuple(sorted(rc.hosts)),
        pattern,
        rc.is_prefix,
        tuple(sorted(rc.headers.items())),
        tuple(sorted(rc.query.items())),
    )


def _methods_cover(earlier: RouteConfig, later: RouteConfig) -> bool:
    """Whether ``earlier`` (of the same shape) takes every method ``later`` does."""
    if not earlier.methods:
        return not later.methods  # any method: tried after a route that lists some
    if not later.methods:
        return False
    return set(allowed_methods(later.methods)) <= set(allowed_methods(earlier.methods))


def _find_instance(
    instances: list[tuple[str, str, Any, Any]], name: str, scope: str, cfg: Any
) -> Any:
    for n, s, c, instance in instances:
        if n == name and s == scope and type(c) is type(cfg) and c == cfg:
            return instance
    return None


def _unknown_plugin(name: str, registry: Registry) -> str:
    known = ", ".join(sorted(registry.filters)) or "none"
    return f"no filter type named {name!r} (known: {known})"
