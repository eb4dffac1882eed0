"""``balance = "hash"``: consistent hashing of a request's key onto an upstream's targets.

The ring itself is tested as pure logic (spread, weights, what moves when a target
goes); the keys (ip, path, consumer, header, cookie), failover and retries through a
running gateway in front of real counting upstreams.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

from engine.config import TargetConfig, load
from engine.schema import ConfigError
from engine.testing import http_request, open_gateway
from engine.upstream import Ring, Target
from plugins.key_auth import hash_key
from tests.upstreams import Upstream, open_counting_upstream, open_refusing_upstream


def _ring(*weights: int) -> tuple[Ring, list[Target]]:
    targets = [Target(TargetConfig(f"10.0.0.{i}:80", w)) for i, w in enumerate(weights)]
    return Ring(targets), targets


def _owner(ring: Ring, key: str) -> Target:
    return next(ring.walk(key.encode()))


def test_keys_spread_over_the_targets_by_weight() -> None:
    ring, targets = _ring(1, 1, 2)
    owners = Counter(_owner(ring, f"user-{i}").address for i in range(20_000))
    share = {t.address: owners[t.address] / 20_000 for t in targets}
    assert 0.20 <= share["10.0.0.0:80"] <= 0.30
    assert 0.20 <= share["10.0.0.1:80"] <= 0.30
    assert 0.42 <= share["10.0.0.2:80"] <= 0.58


def test_a_target_that_leaves_moves_only_its_own_keys() -> None:
    ring, targets = _ring(1, 1, 1, 1)
    smaller = Ring(targets[:3])
    before = {i: _owner(ring, f"k{i}").address for i in range(5000)}
    after = {i: _owner(smaller, f"k{i}").address for i in range(5000)}
    gone = targets[3].address
    moved = [i for i in before if before[i] != after[i]]
    assert moved == [i for i in before if before[i] == gone]  # only the leaver's keys
    assert 0.15 < len(moved) / 5000 < 0.35


def test_the_walk_gives_every_target_once() -> None:
    ring, targets = _ring(1, 3, 2)
    for key in ("a", "b", "c"):
        walked = list(ring.walk(key.encode()))
        assert sorted(t.address for t in walked) == sorted(t.address for t in targets)


@asynccontextmanager
async def _upstreams(n: int) -> AsyncIterator[list[Upstream]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_counting_upstream()) for _ in range(n)]


def _config(targets: list[str], hash_on: str, **route: Any) -> dict[str, Any]:
    return {
        "server": {"trusted_proxies": ["127.0.0.1/32"]},
        "upstreams": {"up": {"targets": targets, "balance": "hash", "hash_on": hash_on}},
        "routes": [{"name": "all", "prefix": "/", "upstream": "up", **route}],
    }


def _who(ups: list[Upstream]) -> dict[str, int]:
    """How many requests each upstream (by index) got, as '0', '1' ..."""
    return {str(i): len(u.requests) for i, u in enumerate(ups) if u.requests}


@pytest.mark.parametrize(
    ("hash_on", "fields", "path"),
    [
        ("ip", lambda i: [("x-forwarded-for", f"203.0.113.{i}")], lambda i: f"/{i}"),
        ("path", lambda i: [], lambda i: f"/items/{i}"),
        ("header:X-Tenant", lambda i: [("x-tenant", f"tenant-{i}")], lambda i: "/"),
        ("cookie:session", lambda i: [("cookie", f"a=1; session=s{i}")], lambda i: "/"),
    ],
)
async def test_each_key_sticks_to_one_target_and_keys_spread(
    hash_on: str, fields: Any, path: Any
) -> None:
    with trio.fail_after(30):
        async with _upstreams(3) as ups:
            async with open_gateway(_config([u.target for u in ups], hash_on)) as gw:
                placed: dict[int, str] = {}
                for i in range(30):
                    seen = set()
                    for _ in range(3):  # the same key, three times: one target
                        before = [len(u.requests) for u in ups]
                        r = await http_request(gw.port, "GET", path(i), fields(i))
                        assert r.status == 200
                        after = [len(u.requests) for u in ups]
                        seen.add(next(n for n in range(3) if after[n] > before[n]))
                    assert len(seen) == 1, (i, seen)
                    placed[i] = str(seen.pop())
    assert len(set(placed.values())) == 3  # 30 keys reached every target


async def test_a_consumer_sticks_to_one_target() -> None:
    consumers = [{"id": f"c{i}", "key_sha256": hash_key(f"key-{i:032d}")} for i in range(12)]
    with trio.fail_after(30):
        async with _upstreams(3) as ups:
            config = _config(
                [u.target for u in ups],
                "consumer",
                plugins={"key-auth": {"consumers": consumers}},
            )
            async with open_gateway(config) as gw:
                for i in range(12):
                    for _ in range(3):
                        r = await http_request(
                            gw.port, "GET", "/", [("x-api-key", f"key-{i:032d}")]
                        )
                        assert r.status == 200
    per_target = [len(u.requests) for u in ups]
    assert sum(per_target) == 36
    assert all(n % 3 == 0 for n in per_target)  # each consumer's three on one target


async def test_a_request_without_its_key_is_balanced_round_robin() -> None:
    with trio.fail_after(20):
        async with _upstreams(3) as ups:
            async with open_gateway(_config([u.target for u in ups], "header:x-tenant")) as gw:
                for _ in range(9):
                    assert (await http_request(gw.port, "GET", "/")).status == 200
    assert _who(ups) == {"0": 3, "1": 3, "2": 3}


async def test_a_down_target_s_keys_go_to_the_next_and_the_others_stay() -> None:
    with trio.fail_after(30):
        async with _upstreams(2) as ups, open_refusing_upstream() as down:
            targets = [ups[0].target, ups[1].target, down.target]
            ring = Ring([Target(TargetConfig(t)) for t in targets])
            async with open_gateway(_config(targets, "header:x-tenant")) as gw:
                got, wanted = [], []
                for i in range(40):
                    before = [len(u.requests) for u in ups]
                    r = await http_request(gw.port, "GET", "/", [("x-tenant", f"t{i}")])
                    assert r.status == 200  # the refused connect moves the call on
                    got.append(
                        next(
                            t for n, t in enumerate(targets[:2]) if len(ups[n].requests) > before[n]
                        )
                    )
                    # Where the ring puts the key, the refusing target passed over:
                    wanted.append(
                        next(
                            t.address
                            for t in ring.walk(f"t{i}".encode())
                            if t.address != down.target
                        )
                    )
    assert got == wanted
    assert down.target in {next(ring.walk(f"t{i}".encode())).address for i in range(40)}


@pytest.mark.parametrize(
    ("upstream", "path", "says"),
    [
        ({"hash_on": "ip"}, "hash_on", 'only used with balance = "hash"'),
        ({"balance": "hash", "hash_on": "header:"}, "hash_on", "header:NAME"),
        ({"balance": "hash", "hash_on": "query:x"}, "hash_on", "one of"),
        ({"balance": "hash", "hash_on": "ip:x"}, "hash_on", "one of"),
        ({"balance": "sticky"}, "balance", "sticky"),
    ],
)
def test_bad_hash_config_names_the_key(upstream: dict[str, Any], path: str, says: str) -> None:
    config = {
        "upstreams": {"up": {"targets": ["127.0.0.1:1"], **upstream}},
        "routes": [{"name": "all", "prefix": "/", "upstream": "up"}],
    }
    with pytest.raises(ConfigError) as err:
        load(config)
    assert err.value.path == f"upstreams.up.{path}"
    assert says in str(err.value)


def test_a_retry_goes_to_the_next_target_on_the_ring() -> None:
    from engine.config import UpstreamConfig
    from engine.upstream import Pool

    pool = Pool("up", UpstreamConfig(["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], "hash"))
    assert pool._ring is not None
    walk = [t.address for t in pool._ring.walk(b"tenant-7")]
    assert pool.pick(set(), 0.0, key=b"tenant-7").address == walk[0]
    assert pool.pick({walk[0]}, 0.0, key=b"tenant-7").address == walk[1]  # a retry's exclude
    assert pool.pick({walk[0]}, 0.0, {walk[1]}, key=b"tenant-7").address == walk[2]
    # Every other one excluded: the excluded owner rather than no target at all.
    assert pool.pick(set(walk), 0.0, key=b"tenant-7").address == walk[0]


def test_large_weights_keep_the_ring_small_and_their_shares() -> None:
    ring, targets = _ring(100_000, 300_000)
    assert len(ring.points) <= 100_002
    owners = Counter(_owner(ring, f"k{i}").address for i in range(8000))
    assert 0.68 <= owners[targets[1].address] / 8000 <= 0.82


def test_weights_in_proportion_keep_the_unchanged_targets_keys() -> None:
    # Weights of 100 (percentages) put the ring past its cap when taken as they are:
    # divided by their common divisor, adding a target moves keys to it only.
    before = Ring([Target(TargetConfig(f"10.0.0.{i}:80", 100)) for i in range(10)])
    grown = [Target(TargetConfig(f"10.0.0.{i}:80", 100)) for i in range(11)]
    after = Ring(grown)
    moved = [
        (a, b)
        for k in range(5000)
        if (a := _owner(before, f"k{k}").address) != (b := _owner(after, f"k{k}").address)
    ]
    assert moved
    assert all(b == "10.0.0.10:80" for _, b in moved)


def test_empty_and_split_keys() -> None:
    from engine.testing import make_exchange
    from engine.upstream import _hash_key

    header, cookie = _hash_key("header:x-tenant"), _hash_key("cookie:session")
    assert header(make_exchange(headers=[("x-tenant", "")])) is None  # round robin
    one = header(make_exchange(headers=[("x-tenant", "a, b")]))
    two = header(make_exchange(headers=[("x-tenant", "a"), ("x-tenant", "b")]))
    assert one == two == b"a,b"
    assert cookie(make_exchange(headers=[("cookie", "session=; x=1")])) is None
    host = _hash_key("header:Host")  # the client's, as the gateway forwards it
    assert host(make_exchange(headers=[("x-forwarded-host", "t1.example")])) == b"t1.example"
