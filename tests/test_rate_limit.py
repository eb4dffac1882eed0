"""The rate-limit plugin: algorithms on explicit instants, the filter on trio's mock
clock, the memory store's bound, and the config errors.

The Redis store is tested against a real redis-server in ``test_rate_limit_redis.py``;
the gateway end to end in ``test_rate_limit_e2e.py``.
"""

from __future__ import annotations

import bisect
import logging
import math
import random
import socket
from typing import Any

import pytest
import trio

from engine.chain import FilterContext, compile_chain, run_request_phases, run_response_phases
from engine.config import RouteConfig
from engine.errors import RateLimited, render_error
from engine.exchange import Exchange, Headers, Identity, Request, Response, Timings
from engine.metrics import counter
from engine.schema import ConfigError, build
from plugins.rate_limit import (
    RateLimit,
    RateLimitConfig,
    RateLimitUnavailable,
    client_network,
    compile_key,
    filtergate_filters,
)
from plugins.rate_limit.algorithms import ALGORITHMS, Quota, SlidingWindow, Verdict, new_verdict
from plugins.rate_limit.memory import MemoryStore
from plugins.rate_limit.store import Outcome, Policy, new_outcome

PATH = "routes[0].plugins.rate-limit"


def make_config(**table: Any) -> RateLimitConfig:
    table.setdefault("limits", [{"limit": 10, "window": "1s"}])
    return build(RateLimitConfig, table, PATH)


def make_filter(scope: str = "route:r", **table: Any) -> RateLimit:
    return RateLimit(make_config(**table), FilterContext("rate-limit", scope))


def make_exchange(
    client: str = "10.0.0.1",
    identity: Identity | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    route: str = "r",
) -> Exchange:
    request = Request(
        method=b"GET",
        path="/x",
        raw_query=b"",
        headers=Headers(list(headers or [])),
        http_version=b"1.1",
        client=client,
        peer=(client, 40000),
    )
    return Exchange(
        request=request,
        request_id="req-1",
        timings=Timings(start=trio.current_time()),
        route=RouteConfig(name=route),
        identity=identity,
    )


async def attempt(f: RateLimit, ex: Exchange | None = None) -> tuple[bool, Response, Exchange]:
    """One request through the filter's phases, run as the engine runs them (sync or
    async as the instance's phases are): (admitted, response, exchange)."""
    ex = ex or make_exchange()
    chain = compile_chain([f])
    try:
        await run_request_phases(chain, ex)
    except RateLimited as e:
        status, headers, body = render_error(e, ex.request_id)
        response = Response(status, Headers(list(headers)), body)
        await run_response_phases(chain.response, ex, response)
        return False, response, ex
    response = Response(200, Headers([(b"content-type", b"text/plain")]), b"ok")
    await run_response_phases(chain.response, ex, response)
    return True, response, ex


def h(response: Response, name: str) -> str | None:
    v = response.headers.get(name)
    return None if v is None else v.decode()


# --- algorithms, pure -----------------------------------------------------------------------


def run(algorithm: str, quota: Quota, instants: list[float]) -> list[bool]:
    """Admissions of one key under one quota for requests at ``instants``."""
    alg = ALGORITHMS[algorithm]
    state = alg.new_state(quota, instants[0])
    out = []
    for now in instants:
        v = alg.check(state, quota, now)
        if v.allowed:
            alg.commit(state, quota, now)
        out.append(v.allowed)
    return out


@pytest.mark.parametrize(
    ("algorithm", "quota", "instants", "expected"),
    [
        # limit 3 per 10 s: the fourth at once is refused, all back after a full window.
        ("sliding-log", Quota(3, 10), [0, 1, 2, 3, 10.5, 11.5], [1, 1, 1, 0, 1, 1]),
        ("sliding-log", Quota(3, 10), [0, 0, 0, 9.99, 10.0], [1, 1, 1, 0, 1]),
        # The counter: a full previous window weighs 1 - f.
        ("sliding-window", Quota(4, 10), [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]),
        # At t = 15 (f = .5) the previous 4 weigh 2: two more fit, a third does not.
        ("sliding-window", Quota(4, 10), [0, 0, 0, 0, 15, 15, 15], [1, 1, 1, 1, 1, 1, 0]),
        # Two windows later, everything has slid out.
        ("sliding-window", Quota(2, 10), [0, 0, 0, 20, 20, 20], [1, 1, 0, 1, 1, 0]),
        # 2 tokens, 1 per 5 s: two at once, then one per 5 s.
        ("token-bucket", Quota(1, 5, burst=2), [0, 0, 0, 4.9, 5, 5], [1, 1, 0, 0, 1, 0]),
        ("token-bucket", Quota(2, 10), [0, 0, 0, 5, 5], [1, 1, 0, 1, 0]),
    ],
)
def test_algorithm_admissions(
    algorithm: str, quota: Quota, instants: list[float], expected: list[int]
) -> None:
    assert run(algorithm, quota, [float(t) for t in instants]) == [bool(e) for e in expected]


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_refusal_predicts_retry_after(algorithm: str) -> None:
    """Retry-After is exact: refused just before it, admitted at it."""
    quota = Quota(5, 10, burst=5)
    alg = ALGORITHMS[algorithm]
    rng = random.Random(7)
    state = alg.new_state(quota, 0.0)
    now = 0.0
    checked = 0
    for _ in range(400):
        now += rng.choice([0.0, 0.01, 0.3, 1.7, 4.0])
        v = alg.check(state, quota, now)
        if v.allowed:
            assert v.retry_after == 0
            alg.commit(state, quota, now)
            continue
        assert v.retry_after > 0
        assert v.reset >= v.retry_after - 1e-9
        assert not alg.check(state, quota, now + v.retry_after - 1e-6).allowed
        assert alg.check(state, quota, now + v.retry_after + 1e-6).allowed
        checked += 1
    assert checked > 20


def _max_in_interval(times: list[float], d: float) -> int:
    """The most admitted instants in any half-open interval ``(t - d, t]``."""
    best = 0
    for i, t in enumerate(times):
        j = bisect.bisect_right(times, t - d)
        best = max(best, i + 1 - j)
    return best


def test_sliding_window_error_bound_adversarial() -> None:
    """A full burst at the end of a window, then steady pressure in the next.

    Documented bound: any interval of length d <= window admits at most
    limit * (1 + d / window); an aligned window at most limit.
    """
    limit, w = 100, 1.0
    quota = Quota(limit, w)
    # 100 requests in the last millisecond of window 0, then one every 1 ms.
    instants = [0.999 + i * 1e-6 for i in range(100)] + [1.0 + i * 0.001 for i in range(2000)]
    admitted = [
        t for t, ok in zip(instants, run("sliding-window", quota, instants), strict=True) if ok
    ]
    for d in (0.001, 0.01, 0.1, 0.5, 0.9, 1.0):
        assert _max_in_interval(admitted, d) <= limit * (1 + d / w) + 1, d
    # No double burst: the 2 ms around the boundary admit the burst and hardly more.
    assert _max_in_interval(admitted, 0.002) <= limit + 1
    # Every aligned window: at most limit.
    for k in range(3):
        assert sum(1 for t in admitted if k * w <= t < (k + 1) * w) <= limit


@pytest.mark.parametrize("seed", range(5))
def test_sliding_window_error_bound_random(seed: int) -> None:
    rng = random.Random(seed)
    limit, w = 20, 2.0
    now, instants = 0.0, []
    for _ in range(3000):
        now += rng.expovariate(30.0) if rng.random() < 0.9 else rng.uniform(0, 1.5)
        instants.append(now)
    admitted = [
        t
        for t, ok in zip(instants, run("sliding-window", Quota(limit, w), instants), strict=True)
        if ok
    ]
    for d in (0.01, 0.5, 1.0, 2.0):
        assert _max_in_interval(admitted, d) <= limit * (1 + d / w) + 1


def test_sliding_log_and_bucket_are_exact() -> None:
    rng = random.Random(3)
    now, instants = 0.0, []
    for _ in range(3000):
        now += rng.expovariate(40.0)
        instants.append(now)
    log_admitted = [
        t
        for t, ok in zip(instants, run("sliding-log", Quota(20, 1.0), instants), strict=True)
        if ok
    ]
    assert _max_in_interval(log_admitted, 1.0) == 20
    bucket = Quota(10, 1.0, burst=15)
    tb_admitted = [
        t for t, ok in zip(instants, run("token-bucket", bucket, instants), strict=True) if ok
    ]
    for d in (0.01, 0.5, 1.0, 3.0):
        assert _max_in_interval(tb_admitted, d) <= 15 + 10 * d + 1e-9


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("seed", range(3))
def test_take_is_check_then_commit(algorithm: str, seed: int) -> None:
    """The fused single-quota path decides and counts exactly as check + commit do."""
    rng = random.Random(seed)
    quota = Quota(rng.randint(1, 6), rng.choice([1.0, 2.5, 10.0]), burst=rng.randint(1, 8))
    alg = ALGORITHMS[algorithm]
    fused = alg.new_state(quota, 0.0)
    split = alg.new_state(quota, 0.0)
    now = 0.0
    for _ in range(300):
        now += rng.choice([0.0, 0.0, 0.01, rng.random(), rng.random() * 3 * quota.window])
        expected = alg.check(split, quota, now)
        if expected.allowed:
            alg.commit(split, quota, now)
        assert alg.take(fused, quota, now) == expected
        assert alg.idle_at(fused, quota) == alg.idle_at(split, quota)


def test_verdicts_and_outcomes_made_in_c_are_the_named_tuples() -> None:
    v = new_verdict((True, 3, 1.5, 0.0))
    assert type(v) is Verdict
    assert v == Verdict(True, 3, 1.5, 0.0)
    assert (v.allowed, v.remaining, v.reset, v.retry_after) == (True, 3, 1.5, 0.0)
    q = Quota(5, 1.0)
    o = new_outcome((True, q, 3, 1.5, 0.0))
    assert type(o) is Outcome
    assert o == Outcome(True, q, 3, 1.5, 0.0)
    assert (o.allowed, o.quota, o.remaining, o.reset) == (True, q, 3, 1.5)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_the_memory_store_decides_one_quota_as_its_algorithm_does(algorithm: str) -> None:
    quota = Quota(3, 1.0, burst=3)
    policy = Policy.build("", algorithm, [quota])
    store = MemoryStore(max_keys=10)
    alg = ALGORITHMS[algorithm]
    state = alg.new_state(quota, 100.0)
    for now in (100.0, 100.1, 100.2, 100.3, 100.9, 101.5, 103.0):
        outcome = store.decide_now("k", policy, now)
        v = alg.take(state, quota, now)
        assert type(outcome) is Outcome
        assert outcome == Outcome(v.allowed, quota, v.remaining, v.reset, v.retry_after)


def test_sliding_window_idle_at() -> None:
    alg = SlidingWindow()
    q = Quota(5, 10)
    s = alg.new_state(q, 3.0)
    alg.commit(s, q, 3.0)
    assert alg.idle_at(s, q) == 20.0
    assert alg.check(s, q, 20.0).remaining == 4


# --- the filter on the mock clock -------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sliding-window", "sliding-log", "token-bucket"])
async def test_no_double_burst_at_window_boundary(
    algorithm: str, autojump_clock: trio.testing.MockClock
) -> None:
    """A fixed window would admit 2 x limit across the boundary; none of these do."""
    with trio.fail_after(60):
        f = make_filter(algorithm=algorithm, limits=[{"limit": 10, "window": "1s"}])
        # Align to a window boundary of the counter, then burst just before and after it.
        now = trio.current_time()
        await trio.sleep(math.floor(now) + 10.999 - now)
        before = [(await attempt(f))[0] for _ in range(15)]
        await trio.sleep(0.002)
        after = [(await attempt(f))[0] for _ in range(15)]
        assert sum(before) == 10
        assert sum(after) == 0
        # And over the next seconds, the rate holds: at most 10 per second after it.
        admitted = 0
        for _ in range(100):
            await trio.sleep(0.05)
            admitted += (await attempt(f))[0]
        assert admitted <= 10 * 5 + 1


async def test_headers_and_429(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        f = make_filter(
            limits=[{"limit": 2, "window": "1s"}, {"limit": 100, "window": "1h"}],
            algorithm="sliding-log",
            legacy_headers=True,
        )
        ok, r, _ = await attempt(f)
        assert ok
        assert h(r, "ratelimit-policy") == "2;w=1, 100;w=3600"
        assert (h(r, "ratelimit-limit"), h(r, "ratelimit-remaining")) == ("2", "1")
        assert h(r, "ratelimit-reset") == "1"
        assert h(r, "x-ratelimit-remaining") == "1"
        ok, r, _ = await attempt(f)
        assert ok
        assert h(r, "ratelimit-remaining") == "0"
        ok, r, _ = await attempt(f)
        assert not ok
        assert r.status == 429
        assert h(r, "retry-after") == "1"
        assert h(r, "ratelimit-remaining") == "0"
        assert h(r, "ratelimit-limit") == "2"
        assert h(r, "ratelimit-policy") == "2;w=1, 100;w=3600"
        assert b'"code":"rate_limited"' in (r.body or b"")
        await trio.sleep(1.0)
        ok, r, _ = await attempt(f)
        assert ok
        # The hourly quota counted the 2 + 1 admitted, not the refused one.
        assert h(r, "ratelimit-remaining") == "1"


async def test_upstream_ratelimit_headers_are_replaced_not_repeated() -> None:
    f = make_filter(limits=[{"limit": 2, "window": "1m"}], legacy_headers=True)
    chain = compile_chain([f])
    ex = make_exchange()
    await run_request_phases(chain, ex)
    upstream = [
        (b"content-type", b"text/plain"),
        (b"ratelimit-remaining", b"999"),
        (b"x-ratelimit-limit", b"999"),
        (b"etag", b'"1"'),
    ]
    response = Response(200, Headers(list(upstream)), b"ok")
    await run_response_phases(chain.response, ex, response)
    items = response.headers.items
    assert [n for n, _ in items] == [
        b"content-type",
        b"etag",
        b"ratelimit-policy",
        b"ratelimit-limit",
        b"ratelimit-remaining",
        b"ratelimit-reset",
        b"x-ratelimit-limit",
        b"x-ratelimit-remaining",
        b"x-ratelimit-reset",
    ]
    assert items[1:5] == [
        (b"etag", b'"1"'),
        (b"ratelimit-policy", b"2;w=60"),
        (b"ratelimit-limit", b"2"),
        (b"ratelimit-remaining", b"1"),
    ]
    assert items[6:8] == [(b"x-ratelimit-limit", b"2"), (b"x-ratelimit-remaining", b"1")]


@pytest.mark.parametrize(
    ("consumer", "key"), [("plain", "c:plain"), ("50%", "c:50%25"), ("a|b", "c:a%7Cb")]
)
async def test_consumer_key_escapes_only_values_that_need_it(consumer: str, key: str) -> None:
    assert compile_key(("consumer",))(make_exchange(identity=Identity(consumer))) == key


async def test_headers_can_be_switched_off(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        f = make_filter(headers=False)
        ok, r, _ = await attempt(f)
        assert ok
        assert h(r, "ratelimit-limit") is None


def test_phases_are_chosen_once_by_store_and_headers() -> None:
    # The memory store decides synchronously, so its request phase is a plain call;
    # Redis needs an await. Without headers there is nothing to do on the way out.
    memory = compile_chain([make_filter()])
    assert [(p.filter.name, p.is_async) for p in memory.request] == [("rate-limit", False)]
    assert [p.is_async for p in memory.response] == [False]
    redis = compile_chain([make_filter(store="redis")])
    assert [p.is_async for p in redis.request] == [True]
    quiet = compile_chain([make_filter(headers=False)])
    assert quiet.response == []
    assert len(quiet.request) == 1


async def test_reported_quota_is_closest_to_exhaustion(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        f = make_filter(
            algorithm="sliding-log",
            limits=[{"limit": 5, "window": "1s"}, {"limit": 7, "window": "1m"}],
        )
        seen = []
        for _ in range(7):
            ok, r, _ = await attempt(f)
            assert ok
            seen.append((h(r, "ratelimit-limit"), h(r, "ratelimit-remaining")))
            await trio.sleep(0.5)
        assert seen[0] == ("5", "4")
        assert seen[-1] == ("7", "0")
        ok, r, _ = await attempt(f)
        assert not ok
        assert h(r, "ratelimit-limit") == "7"
        assert int(h(r, "retry-after") or 0) > 50


async def test_refused_by_one_quota_spends_none(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        f = make_filter(
            algorithm="sliding-log",
            limits=[{"limit": 3, "window": "1s"}, {"limit": 5, "window": "1h"}],
        )
        results = []
        for _ in range(20):  # 17 refusals by the per-second quota must not spend the hour's
            results.append((await attempt(f))[0])
        assert sum(results) == 3
        await trio.sleep(1.0)
        assert [(await attempt(f))[0] for _ in range(3)] == [True, True, False]


async def test_keys(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        alice = Identity("alice", groups=("staff",), claims={"tenant": "acme"})
        bob = Identity("bob", claims={"tenant": "acme"})
        f = make_filter(limits=[{"limit": 1, "window": "1m"}])
        assert (await attempt(f, make_exchange(identity=alice)))[0]
        assert not (await attempt(f, make_exchange(identity=alice, client="10.9.9.9")))[0]
        assert (await attempt(f, make_exchange(identity=bob)))[0]
        # Anonymous traffic is counted per client address.
        assert (await attempt(f, make_exchange(client="10.0.0.7")))[0]
        assert not (await attempt(f, make_exchange(client="10.0.0.7")))[0]
        assert (await attempt(f, make_exchange(client="10.0.0.8")))[0]

        by_claim = make_filter(key=["claim:tenant"], limits=[{"limit": 1, "window": "1m"}])
        assert (await attempt(by_claim, make_exchange(identity=alice)))[0]
        assert not (await attempt(by_claim, make_exchange(identity=bob)))[0]

        by_header = make_filter(
            key=["header:X-Tenant", "route"], limits=[{"limit": 1, "window": "1m"}]
        )
        t1 = [(b"x-tenant", b"t1")]
        assert (await attempt(by_header, make_exchange(headers=t1)))[0]
        assert not (await attempt(by_header, make_exchange(headers=t1, client="1.1.1.1")))[0]
        assert (await attempt(by_header, make_exchange(headers=t1, route="other")))[0]
        assert (await attempt(by_header, make_exchange(headers=[(b"x-tenant", b"t2")])))[0]
        # A "|" in a value cannot forge another combination of parts.
        forged = [(b"x-tenant", b"t1|r")]
        assert (await attempt(by_header, make_exchange(headers=forged, route="")))[0]
        # A huge header value is hashed, not kept.
        huge = [(b"x-tenant", b"x" * 10_000)]
        assert (await attempt(by_header, make_exchange(headers=huge)))[0]
        assert not (await attempt(by_header, make_exchange(headers=huge)))[0]
        assert isinstance(by_header.store, MemoryStore)
        assert max(len(k) for k in by_header.store._entries) < 300

        by_ip = make_filter(key="ip", limits=[{"limit": 1, "window": "1m"}])
        assert (await attempt(by_ip, make_exchange(identity=alice)))[0]
        assert not (await attempt(by_ip, make_exchange(identity=bob)))[0]


@pytest.mark.parametrize(
    ("key", "short_key"),
    [
        (("consumer",), "c:a%7Cb"),
        (("ip",), "10.0.0.1"),
        (("route",), "a%7Cb"),
        (("header:x-tenant",), "a%7Cb"),
        (("consumer", "ip"), "c:a%7Cb|10.0.0.1"),
    ],
)
async def test_compiled_keys_escape_and_bound_every_shape(
    key: tuple[str, ...], short_key: str
) -> None:
    compiled = compile_key(key)

    def exchange(value: str) -> Exchange:
        return make_exchange(
            identity=Identity(value), headers=[(b"x-tenant", value.encode())], route=value
        )

    assert compiled(exchange("a|b")) == short_key
    long = compiled(exchange("a|b%" * 100))
    if key != ("ip",):
        assert long.startswith("sha256:")
        assert len(long) < 100
        assert compiled(exchange("a|b%" * 100)) == long
    assert compile_key(("consumer",))(make_exchange(client="10.0.0.9")) == "ip:10.0.0.9"


@pytest.mark.parametrize(
    ("address", "prefix", "counted"),
    [
        ("10.0.0.9", 64, "10.0.0.9"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 64, "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::7", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:aaaa::1", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:aaaa::1", 128, "2001:db8:1:2:aaaa::1"),
        # At 128 too, one address is one counter, however it is written.
        ("2001:DB8:0:0::1", 128, "2001:db8::1"),
        ("2001:db8::1%eth0", 128, "2001:db8::1"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        # IPv4 clients seen through IPv6: their own address, not all of one /64.
        ("::ffff:10.0.0.9", 64, "10.0.0.9"),
        ("::ffff:10.0.0.9", 128, "10.0.0.9"),
        ("64:ff9b::10.0.0.9", 64, "10.0.0.9"),
        ("64:ff9b::a00:9", 128, "10.0.0.9"),
        ("not-an-address", 64, "not-an-address"),
        ("1:2:3", 64, "1:2:3"),
    ],
)
def test_ipv6_clients_are_counted_per_network(address: str, prefix: int, counted: str) -> None:
    assert client_network(address, prefix) == counted


async def test_an_ipv6_client_cannot_escape_its_limit_by_changing_address() -> None:
    by_ip = compile_key(("ip",), 64)
    anonymous = compile_key(("consumer",), 64)
    one, other = make_exchange("2001:db8:0:7::1"), make_exchange("2001:db8:0:7:ffff::2")
    assert by_ip(one) == by_ip(other) == "2001:db8:0:7::/64"
    assert anonymous(one) == anonymous(other) == "ip:2001:db8:0:7::/64"
    assert compile_key(("ip",), 128)(one) == "2001:db8:0:7::1"
    # Through the filter: the second address of the same /64 meets the spent quota.
    f = make_filter(limits=[{"limit": 1, "window": "1m"}], key="ip")
    with trio.fail_after(5):
        assert [(await attempt(f, ex))[0] for ex in (one, other)] == [True, False]
        assert (await attempt(f, make_exchange("2001:db8:0:8::1")))[0]  # another /64


async def test_groups_are_tiers(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        f = make_filter(
            limits=[{"limit": 2, "window": "1m"}],
            groups={
                "gold": {"limits": [{"limit": 5, "window": "1m"}]},
                "silver": {"limits": [{"limit": 3, "window": "1m"}]},
            },
        )

        async def admitted(identity: Identity | None) -> tuple[int, str | None]:
            oks = []
            last = None
            for _ in range(8):
                ok, r, _ = await attempt(f, make_exchange(identity=identity))
                oks.append(ok)
                last = h(r, "ratelimit-policy")
            return sum(oks), last

        assert await admitted(Identity("a", groups=("silver", "gold"))) == (5, "5;w=60")
        assert await admitted(Identity("b", groups=("silver",))) == (3, "3;w=60")
        assert await admitted(Identity("c", groups=("other",))) == (2, "2;w=60")
        assert await admitted(None) == (2, "2;w=60")


async def test_concurrent_requests_on_one_key_never_exceed_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        f = make_filter(algorithm="sliding-log", limits=[{"limit": 50, "window": "1m"}])
        chain = compile_chain([f])
        results: list[int] = []

        async def one() -> None:
            ex = make_exchange()
            try:
                await run_request_phases(chain, ex)
                results.append(200)
            except RateLimited:
                results.append(429)
            await run_response_phases(chain.response, ex, Response(200))

        async with trio.open_nursery() as nursery:
            for _ in range(300):
                nursery.start_soon(one)
        assert results.count(200) == 50
        assert results.count(429) == 250


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("failure", ["fail_open", "fail_closed"])
async def test_failure_policy_is_logged_and_counted(
    failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis refusing connections (nothing listens on the port): the policy applies."""
    caplog.set_level(logging.DEBUG, logger="filtergate.plugins.rate-limit")
    with trio.fail_after(10):
        url = f"redis://127.0.0.1:{_closed_port()}/0"
        f = make_filter(failure=failure, store="redis", redis={"url": url})
        failures = counter("filtergate_rate_limit_store_failures_total", "")
        before = failures.value(store="redis", policy=failure)
        for _ in range(2):  # the first finds Redis down, the second does not even try
            ex = make_exchange()
            if failure == "fail_open":
                await f.on_request(ex)
            else:
                with pytest.raises(RateLimitUnavailable) as info:
                    await f.on_request(ex)
                assert info.value.status == 503
                assert info.value.headers == [(b"retry-after", b"1")]
            response = Response(200)
            f.on_response(ex, response)
            assert h(response, "ratelimit-policy") == "10;w=1"
            assert h(response, "ratelimit-remaining") is None
        assert failures.value(store="redis", policy=failure) == before + 2
        verb = "admitting" if failure == "fail_open" else "refusing"
        lines = [r for r in caplog.records if verb in r.getMessage()]
        assert len(lines) == 2
        # Per request at debug only, and the key (it may hold an API key) fingerprinted.
        assert all(r.levelno == logging.DEBUG and "sha256:" in r.getMessage() for r in lines)
        assert not any("ip:" in r.getMessage() for r in lines)
        await f.store.aclose()


def test_plugin_registration() -> None:
    assert filtergate_filters() == [RateLimit]
    assert RateLimit.name == "rate-limit"
    assert RateLimit.Config is RateLimitConfig


# --- the memory store -------------------------------------------------------------------------


def test_memory_store_is_bounded_under_a_flood_of_keys() -> None:
    store = MemoryStore(max_keys=1000)
    policy = Policy.build("", "sliding-window", [Quota(5, 60.0)])
    evictions = counter("filtergate_rate_limit_evictions_total", "")
    before = evictions.value()
    now = 0.0
    for i in range(50_000):
        now += 0.0001
        assert store.decide_now(f"ip:{i}", policy, now).allowed
        assert len(store) <= 1000
    assert evictions.value() - before == 49_000
    # The keys still held are the most recent ones, and they still count.
    again = [store.decide_now("ip:49999", policy, now).allowed for _ in range(5)]
    assert again == [True, True, True, True, False]


def test_memory_store_drops_idle_keys_as_traffic_passes() -> None:
    store = MemoryStore(max_keys=10_000)
    policy = Policy.build("", "sliding-log", [Quota(5, 1.0)])
    for i in range(5000):
        store.decide_now(f"k{i}", policy, 0.0)
    assert len(store) == 5000
    # Long after, steady traffic on one key drains the idle ones without a full scan.
    for i in range(2000):
        store.decide_now("steady", policy, 10.0 + i * 0.5)
    assert len(store) == 1
    for i in range(100):
        store.decide_now(f"k{i}", policy, 2000.0)
    # ("steady" went idle by t = 1010.5, and that traffic swept it.)
    assert store.sweep_all(5000.0) == 100


def test_memory_store_memory_does_not_grow_with_distinct_keys() -> None:
    import tracemalloc

    policy = Policy.build("", "sliding-window", [Quota(5, 60.0), Quota(100, 3600.0)])
    store = MemoryStore(max_keys=1000)
    tracemalloc.start()
    try:
        for i in range(2000):
            store.decide_now(f"flood{i}", policy, 1.0)
        full = tracemalloc.get_traced_memory()[0]
        for i in range(2000, 10_000):
            store.decide_now(f"flood{i}", policy, 1.0)
        grown = tracemalloc.get_traced_memory()[0] - full
    finally:
        tracemalloc.stop()
    assert len(store) == 1000
    assert full > 150_000  # what 1000 keys take, so the next bound means something
    assert grown < 20_000  # bytes: 8000 more keys replaced the 1000 held


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "path", "message"),
    [
        (
            {"limits": [{"limit": 10, "window": "fast"}]},
            "limits[0].window",
            'expected a duration like "1m"',
        ),
        ({"limits": [{"limit": 0, "window": "1s"}]}, "limits[0].limit", "expected at least 1"),
        ({"limits": [{"limit": 1, "window": 0}]}, "limits[0].window", "longer than 0"),
        ({"limits": [{"window": "1s"}]}, "limits[0].limit", "required key is missing"),
        ({"limits": []}, "limits", "at least one limit"),
        ({"limits": None}, "limits", "required key is missing"),
        ({"limits": [{"limit": 1, "window": "1s", "burst": 5}]}, "limits[0].burst", "token-bucket"),
        ({"algorithm": "fixed-window"}, "algorithm", "expected one of"),
        ({"key": ["consumer", "cookie:x"]}, "key[1]", '"header:NAME"'),
        ({"key": "header:"}, "key", '"claim:NAME"'),
        ({"store": "memcached"}, "store", "expected one of"),
        ({"redis": {"url": "http://x"}}, "redis.url", "redis://"),
        ({"redis": {"url": "redis://h:6379/zero"}}, "redis.url", "database number"),
        ({"redis": {"timeout": "soon"}}, "redis.timeout", "duration"),
        ({"redis": {"pool_size": 0}}, "redis.pool_size", "at least 1"),
        ({"redis": {"host": "x"}}, "redis.host", "unknown key"),
        ({"failure": "open"}, "failure", "expected one of"),
        ({"windw": "1s"}, "windw", "unknown key"),
        (
            {"groups": {"gold": {"limits": [{"limit": 5, "window": "1y"}]}}},
            "groups.gold.limits[0].window",
            "duration",
        ),
        (
            {"groups": {"gold": {"limits": [{"limit": 5, "window": "1s", "burst": 2}]}}},
            "groups.gold.limits[0].burst",
            "token-bucket",
        ),
        ({"max_keys": 0}, "max_keys", "at least 1"),
        ({"ipv6_prefix": 0}, "ipv6_prefix", "1 to 128"),
        ({"ipv6_prefix": 129}, "ipv6_prefix", "1 to 128"),
    ],
)
def test_config_errors_name_the_key_path(table: dict[str, Any], path: str, message: str) -> None:
    table = {"limits": [{"limit": 10, "window": "1s"}], **table}
    if table.get("limits") is None:
        del table["limits"]
    with pytest.raises(ConfigError) as info:
        build(RateLimitConfig, table, PATH)
    assert info.value.path == f"{PATH}.{path}"
    assert message in info.value.message


def test_config_defaults_and_shapes() -> None:
    c = make_config(
        limits=[{"limit": 10, "window": "1s"}, {"limit": 1000, "window": "1h", "burst": 50}],
        algorithm="token-bucket",
        key=["consumer", "route"],
        groups={"gold": {"limits": [{"limit": 100, "window": "1s"}]}},
        redis={"url": "redis://:s3cret@10.0.0.5:6380/2", "timeout": "50ms"},
    )
    assert c.key_parts == ("consumer", "route")
    assert c.limits[1].quota() == Quota(1000, 3600.0, 50)
    assert c.redis.timeout == 0.05
    assert (c.store, c.failure, c.headers, c.legacy_headers) == ("memory", "fail_open", True, False)
    f = RateLimit(c, FilterContext("rate-limit", "global"))
    assert f._default.header == b"10;w=1;burst=10, 1000;w=3600;burst=50"
