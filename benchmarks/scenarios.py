"""The scenarios: what runs in front of the stub, with which request and concurrency.

A filtergate scenario is a function ``(Env) -> GatewayPlan``: the gateway.toml (as a
dict, written with tomli_w), the request path and extra headers the load sends, and
the filters it needs. A scenario whose filters are not installed is reported as
skipped, never as a crash.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.loadgen import BROWSER_HEADERS
from benchmarks.servers import HOST

JWT_SECRET = "filtergate-bench-secret-0123456789abcdef"
API_KEY = "bench-key-0123456789"
NOOP_FILTERS = 10
ROUTE_PATH = "/api/v1/items"


@dataclass
class Env:
    """What a scenario builder may use: the stub, a redis, the discovered filters."""

    workdir: Path
    stub_port: int
    gateway_port: int
    available_filters: frozenset[str]
    redis_port: Callable[[], int]  # starts a redis-server on first call
    noop_pythonpath: Callable[[], str]  # makes the no-op plugin discoverable


@dataclass
class GatewayPlan:
    config: dict[str, Any]
    path: str = "/"
    headers: list[tuple[str, str]] = field(default_factory=list)
    needs: tuple[str, ...] = ()  # filter names that must be available
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    """One row of the table.

    ``target``: direct | forwarder | floor (trio + h11 parsing both heads, nothing
    else) | proxypy (Connection: close clients) | proxypy-keepalive (keep-alive clients,
    the relay plugin) | proxypy-parsed (the same, responses parsed by proxy.py) | nginx |
    filtergate.
    ``kind``: load (a throughput run), bodies (1 GiB up and down) or idle (many idle
    connections).
    """

    name: str
    title: str
    target: str
    kind: str = "load"
    connections: int = 32
    request: str = "bare"
    workers: int = 1
    plan: Callable[[Env], GatewayPlan] | None = None
    quick: bool = False


BROWSER_PATH = "/api/v1/items?page=2&sort=desc"


def request_for(sc: Scenario, plan: GatewayPlan | None = None) -> tuple[str, list[tuple[str, str]]]:
    """The path and headers of the load's request: the browser-like ones for a browser
    request, and what the gateway plan asks for (its path for a bare request, the
    headers its filters need)."""
    path, headers = "/", []
    if sc.request == "browser":
        path, headers = BROWSER_PATH, list(BROWSER_HEADERS)
    if plan is not None:
        if plan.path != "/" and sc.request == "bare":
            path = plan.path
        headers += plan.headers
    return path, headers


def base_config(env: Env, port: int, workers: int = 1) -> dict[str, Any]:
    return {
        "server": {"listen": [f"{HOST}:{port}"], "workers": workers},
        "admin": {"enabled": False},
        "upstreams": {"stub": {"targets": [f"{HOST}:{env.stub_port}"]}},
        "routes": [{"name": "bench", "prefix": "/", "upstream": "stub"}],
    }


def jwt_token() -> str:
    import jwt

    now = int(time.time())
    claims = {"iss": "bench", "sub": "bench-user", "iat": now, "exp": now + 24 * 3600}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def plugin_settings(name: str, env: Env) -> tuple[dict[str, Any], list[tuple[str, str]]] | None:
    """A benchmark config for one built-in filter and the request headers it needs.

    None for a filter this harness does not know: it is then tried with an empty
    config (its defaults).
    """
    if name == "jwt-auth":
        issuer = {"issuer": "bench", "algorithms": ["HS256"], "secret": JWT_SECRET}
        return {"issuers": [issuer]}, [("Authorization", f"Bearer {jwt_token()}")]
    if name == "key-auth":
        digest = hashlib.sha256(API_KEY.encode()).hexdigest()
        return {"consumers": [{"id": "bench", "key_sha256": digest}]}, [("X-Api-Key", API_KEY)]
    if name == "rate-limit":
        # A limit no run reaches: the cost of the decision, never a 429.
        return {"limits": [{"limit": 1_000_000_000, "window": "1s"}], "store": "memory"}, []
    if name == "transform":
        return {
            "request": {"headers": {"set": {"x-bench": "1"}, "remove": ["cookie"]}},
            "response": {"headers": {"set": {"x-served-by": "filtergate"}}},
        }, []
    if name == "aggregate":
        # Three backend calls composed into one answer; compare its latency with three
        # sequential direct calls (3 x the direct row's).
        calls = [{"name": n, "upstream": "stub", "path": f"/{n}"} for n in ("a", "b", "c")]
        return {"calls": calls}, []
    if name == "cors":
        # A page of another origin calling: the answer gets its CORS fields.
        origin = "https://app.example.com"
        return {"origins": [origin]}, [("Origin", origin)]
    if name == "cache":
        # The stub's answer says nothing of freshness: stored for a minute, every
        # measured request is a hit (what a hit costs; a miss costs about a bare request).
        return {"ttl": "1m"}, []
    if name in ("circuit-breaker", "retry", "compress"):
        # (compress: the stub's 2-byte answer is under min_size, so this is the cost of
        # deciding not to compress, which every small API answer pays.)
        return {}, []
    return None


#: Filters that answer requests themselves (or need other upstreams) rather than wrap
#: the proxying: measured alone, but not in the one-route full chain.
NOT_IN_FULL_CHAIN = frozenset({"aggregate", "cache", "mock", "static", "key-auth"})


def with_plugins(env: Env, config: dict[str, Any], names: list[str]) -> GatewayPlan:
    plugins: dict[str, Any] = {}
    headers: list[tuple[str, str]] = []
    for name in names:
        settings = plugin_settings(name, env)
        table, extra = settings if settings is not None else ({}, [])
        plugins[name] = table
        headers += extra
    config["routes"][0]["plugins"] = plugins
    return GatewayPlan(config, headers=headers, needs=tuple(names))


def plan_bare(env: Env, port: int, workers: int = 1) -> GatewayPlan:
    return GatewayPlan(base_config(env, port, workers))


def plan_full(env: Env, port: int) -> GatewayPlan:
    wanted = ["jwt-auth", "rate-limit"]
    wanted += sorted(
        n for n in env.available_filters if n not in wanted and n not in NOT_IN_FULL_CHAIN
    )
    return with_plugins(env, base_config(env, port), wanted)


def plan_full_request(env: Env, port: int) -> GatewayPlan:
    """No filters, but the full chain's request (its bearer token and all): the
    baseline that leaves only the chain's own cost in the full chain's ratio."""
    full = plan_full(env, port)
    return GatewayPlan(base_config(env, port), headers=full.headers, needs=full.needs)


def plan_plugin(name: str) -> Callable[[Env, int], GatewayPlan]:
    def plan(env: Env, port: int) -> GatewayPlan:
        return with_plugins(env, base_config(env, port), [name])

    return plan


def plan_redis(env: Env, port: int) -> GatewayPlan:
    plan = with_plugins(env, base_config(env, port), ["rate-limit"])
    table = plan.config["routes"][0]["plugins"]["rate-limit"]
    table["store"] = "redis"
    table["redis"] = {"url": f"redis://{HOST}:{env.redis_port()}/0"}
    return plan


def plan_noops(env: Env, port: int) -> GatewayPlan:
    config = base_config(env, port)
    config["routes"][0]["plugins"] = {f"bench-noop-{i}": {} for i in range(NOOP_FILTERS)}
    return GatewayPlan(
        config,
        needs=(),
        env={"PYTHONPATH": env.noop_pythonpath()},
    )


def plan_routes(count: int) -> Callable[[Env, int], GatewayPlan]:
    """``count`` prefix routes; the load hits the last one declared (the worst case for
    a router that tries routes in order)."""

    def plan(env: Env, port: int) -> GatewayPlan:
        config = base_config(env, port)
        config["routes"] = [
            {"name": f"r{i}", "prefix": f"/svc{i}{ROUTE_PATH}", "upstream": "stub"}
            for i in range(count)
        ]
        return GatewayPlan(config, path=f"/svc{count - 1}{ROUTE_PATH}/42")

    return plan


def plan_bodies(env: Env, port: int) -> GatewayPlan:
    config = base_config(env, port)
    # Streaming has no size cap of its own; the default request cap (10 MiB) would
    # refuse the upload.
    config["server"]["max_body_size"] = "4GiB"
    return GatewayPlan(config)


def plan_idle(env: Env, port: int) -> GatewayPlan:
    return GatewayPlan(base_config(env, port))


def _bind(
    fn: Callable[[Env, int], GatewayPlan],
) -> Callable[[Env], GatewayPlan]:
    def plan(env: Env) -> GatewayPlan:
        return fn(env, env.gateway_port)

    return plan


def all_scenarios(builtin_filters: list[str]) -> list[Scenario]:
    """Every scenario, in table order; ``builtin_filters`` adds one row per filter."""
    s: list[Scenario] = []
    for conns in (32, 64, 256):
        suffix = "" if conns == 32 else f"-c{conns}"
        quick = conns == 32
        s.append(
            Scenario(
                f"direct{suffix}",
                f"direct to stub, c{conns}",
                "direct",
                connections=conns,
                quick=quick,
            )
        )
        s.append(
            Scenario(
                f"forwarder{suffix}",
                f"trio+h11 forwarder, c{conns}",
                "forwarder",
                connections=conns,
                quick=quick,
            )
        )
        s.append(
            Scenario(
                f"filtergate{suffix}",
                f"filtergate no filters, c{conns}",
                "filtergate",
                connections=conns,
                plan=_bind(plan_bare),
                quick=quick,
            )
        )
    s.append(
        Scenario("direct-browser", "direct, browser-like request", "direct", request="browser")
    )
    s.append(
        Scenario(
            "forwarder-browser", "forwarder, browser-like request", "forwarder", request="browser"
        )
    )
    s.append(
        Scenario(
            "filtergate-browser",
            "filtergate no filters, browser-like",
            "filtergate",
            request="browser",
            plan=_bind(plan_bare),
        )
    )
    s.append(Scenario("proxypy", "proxy.py 1 worker (Connection: close)", "proxypy", quick=True))
    s.append(
        Scenario(
            "proxypy-keepalive",
            "proxy.py 1 worker, keep-alive plugin",
            "proxypy-keepalive",
            quick=True,
        )
    )
    s.append(
        Scenario(
            "proxypy-parsed",
            "proxy.py 1 worker, keep-alive plugin, responses parsed",
            "proxypy-parsed",
        )
    )
    s.append(
        Scenario("floor", "trio+h11 floor: both heads parsed, nothing else", "floor", quick=True)
    )
    s.append(Scenario("nginx", "nginx reverse proxy, 1 worker", "nginx", quick=True))
    s.append(
        Scenario(
            "filtergate-2w",
            "filtergate no filters, 2 workers",
            "filtergate",
            workers=2,
            plan=_bind(lambda env, port: plan_bare(env, port, workers=2)),
        )
    )
    s.append(
        Scenario(
            "full-chain", "filtergate full chain", "filtergate", plan=_bind(plan_full), quick=True
        )
    )
    s.append(
        Scenario(
            "filtergate-full-request",
            "filtergate no filters, full chain's request",
            "filtergate",
            plan=_bind(plan_full_request),
            quick=True,
        )
    )
    s.append(
        Scenario(
            "full-chain-browser",
            "filtergate full chain, browser-like",
            "filtergate",
            request="browser",
            plan=_bind(plan_full),
        )
    )
    for name in builtin_filters:
        s.append(
            Scenario(
                f"plugin-{name}",
                f"filtergate + {name} alone",
                "filtergate",
                plan=_bind(plan_plugin(name)),
            )
        )
    s.append(
        Scenario(
            "rate-limit-redis",
            "filtergate + rate-limit on redis",
            "filtergate",
            plan=_bind(plan_redis),
        )
    )
    s.append(
        Scenario(
            "noop-10",
            f"filtergate + {NOOP_FILTERS} no-op filters",
            "filtergate",
            plan=_bind(plan_noops),
        )
    )
    s.append(
        Scenario("routes-10", "filtergate, 10 routes", "filtergate", plan=_bind(plan_routes(10)))
    )
    s.append(
        Scenario(
            "routes-10000",
            "filtergate, 10,000 routes",
            "filtergate",
            plan=_bind(plan_routes(10_000)),
        )
    )
    s.append(Scenario("bodies-direct", "1 GiB up + down, direct", "direct", kind="bodies"))
    s.append(
        Scenario(
            "bodies",
            "1 GiB up + down via filtergate",
            "filtergate",
            kind="bodies",
            plan=_bind(plan_bodies),
        )
    )
    s.append(
        Scenario(
            "idle-10k",
            "10,000 idle keep-alive conns",
            "filtergate",
            kind="idle",
            plan=_bind(plan_idle),
        )
    )
    return s


def noop_distribution(workdir: Path) -> str:
    """A directory that, on PYTHONPATH, makes the bench no-op plugin discoverable.

    It holds a bare ``*.dist-info`` declaring the entry point
    ``[filtergate] bench-noop = benchmarks.noop_plugin``: importlib.metadata finds it
    like an installed distribution, without installing anything.
    """
    root = Path(tempfile.mkdtemp(prefix="noop-dist-", dir=workdir))
    info = root / "filtergate_bench_noop-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: filtergate-bench-noop\nVersion: 0.0.0\n"
    )
    (info / "entry_points.txt").write_text("[filtergate]\nbench-noop = benchmarks.noop_plugin\n")
    return str(root)
