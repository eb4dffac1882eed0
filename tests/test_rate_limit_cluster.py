"""rate-limit on a Redis Cluster: slots, redirections, and the gateway end to end,
against real redis-server processes in cluster mode on 127.0.0.1 (three masters).

Real sockets and the real clock: a cluster's nodes agree in real time, so tests wait
for conditions, never for fixed times, within their deadline.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio
import trio.testing

from engine.schema import ConfigError
from engine.testing import Stubs, http_request, open_gateway
from plugins.rate_limit import RedisConfig
from plugins.rate_limit.algorithms import Quota
from plugins.rate_limit.redis import RedisCluster, RedisStore, key_slot, parse_redis_url
from plugins.rate_limit.store import Policy, StoreUnavailable
from tests.redis_server import RedisServer, command, open_redis_cluster

DEADLINE = 30
POLICY = Policy.build("", "sliding-window", [Quota(3, 60.0)])


def test_key_slots_are_redis_own() -> None:
    assert key_slot(b"123456789") == 0x31C3  # CRC16/XMODEM's check value
    assert key_slot(b"foo") == 12182  # as CLUSTER KEYSLOT foo says
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}")  # an empty tag: the whole key
    assert key_slot(b"foo{}{bar}") != key_slot(b"bar")


def _cluster(url: str) -> RedisCluster:
    return RedisCluster(parse_redis_url(url), timeout=2.0, pool_size=4)


async def _start_migrating(cluster: Any, key: bytes) -> tuple[int, RedisServer, RedisServer, str]:
    """Put ``key``'s slot in migration from its master to another (IMPORTING on the
    target, MIGRATING on the source; no key moved): its slot, source, target and the
    target's node id."""
    slot = key_slot(key)
    source = await cluster.owner(slot)
    target = next(n for n in cluster.nodes if n is not source)
    source_id, target_id = await cluster.node_id(source), await cluster.node_id(target)
    await command(target.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    await command(source.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    return slot, source, target, target_id


def _caller_of(client: RedisCluster, node: RedisServer, not_in_slot: int = -1) -> str:
    """A caller key (prefix ``t:``) whose slot ``node`` serves, as ``client``'s map says."""
    return next(
        f"k{i}"
        for i in range(10_000)
        if client.node_of(f"t:{{k{i}}}".encode()) == ("127.0.0.1", node.port)
        and key_slot(f"t:{{k{i}}}".encode()) != not_in_slot
    )


@contextmanager
def _hung(*nodes: RedisServer) -> Iterator[None]:
    """``nodes`` stopped (SIGSTOP: they accept connections and never answer, as behind a
    network blackhole) while the block runs, then resumed."""
    for node in nodes:
        assert node.process is not None
        node.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for node in nodes:
            assert node.process is not None
            node.process.send_signal(signal.SIGCONT)


async def _allowed(store: RedisStore, key: str) -> bool:
    return (await store.decide(key, POLICY, trio.current_time())).allowed


async def test_decisions_go_to_the_master_of_their_slot() -> None:
    with trio.fail_after(DEADLINE):
        async with open_redis_cluster(3) as cluster:
            client = _cluster(cluster.url)
            store = RedisStore(client, prefix="t:", retry_interval=0.1)
            try:
                keys = [f"caller-{i}" for i in range(12)]
                first = [await _allowed(store, k) for k in keys]
                for _ in range(2):
                    for k in keys:
                        await _allowed(store, k)
                fourth = [await _allowed(store, k) for k in keys]
                # Each caller's counters are on one node: the one its slot says.
                for k in keys:
                    slot = key_slot(f"t:{{{k}}}".encode())
                    owner = await cluster.owner(slot)
                    assert int(await command(owner.port, "CLUSTER", "COUNTKEYSINSLOT", slot)) >= 1
                sizes = [int(await command(n.port, "DBSIZE")) for n in cluster.nodes]
            finally:
                await store.aclose()
    assert first == [True] * 12
    assert fourth == [False] * 12  # the limit is 3, kept whichever node holds it
    assert sum(1 for s in sizes if s) >= 2  # the keys are spread over the masters


async def test_a_moved_slot_is_followed_and_the_map_asked_again() -> None:
    with trio.fail_after(DEADLINE):
        async with open_redis_cluster(3) as cluster:
            client = _cluster(cluster.url)
            store = RedisStore(client, prefix="t:", retry_interval=0.1)
            try:
                assert await _allowed(store, "k")
                slot = key_slot(b"t:{k}")
                right = client._slots[slot]
                assert right is not None
                # A stale map (as after a resharding): the slot's old master answers MOVED.
                wrong = next(n for n in client._masters if n != right)
                client._slots[slot] = wrong
                assert await _allowed(store, "k")
                assert client._slots[slot] == right
                assert await _allowed(store, "k")
                assert not await _allowed(store, "k")  # the count went on: 3 of 3, then no
            finally:
                await store.aclose()


async def test_a_slot_being_migrated_is_asked_of_its_new_master() -> None:
    """While a slot migrates, its old master answers ASK for keys it does not hold; the
    command goes to the new one after ASKING, and the map is not changed."""
    with trio.fail_after(DEADLINE):
        async with open_redis_cluster(3) as cluster:
            slot, source, target, _ = await _start_migrating(cluster, b"t:{fresh}")
            client = _cluster(cluster.url)
            store = RedisStore(client, prefix="t:", retry_interval=0.1)
            try:
                assert await _allowed(store, "fresh")
                assert client._slots[slot] == ("127.0.0.1", source.port)  # not moved yet
                on_target = int(await command(target.port, "DBSIZE"))
                on_source = int(await command(source.port, "DBSIZE"))
            finally:
                await store.aclose()
    assert on_target >= 1
    assert on_source == 0


async def test_the_gateway_limits_through_a_cluster(stubs: Stubs) -> None:
    with trio.fail_after(DEADLINE):
        async with open_redis_cluster(3) as cluster:
            plugin = {
                "limits": [{"limit": 2, "window": "1m"}],
                "key": ["header:x-caller"],
                "store": "redis",
                "redis": {"url": cluster.url, "cluster": True},
            }
            config = {
                "upstreams": {"up": {"targets": [stubs.target("echo")]}},
                "routes": [
                    {
                        "name": "r",
                        "prefix": "/",
                        "upstream": "up",
                        "plugins": {"rate-limit": plugin},
                    }
                ],
            }
            async with open_gateway(config) as gw:
                statuses = {}
                for caller in ("a", "b", "c", "d"):
                    statuses[caller] = [
                        (await http_request(gw.port, "GET", "/", [("x-caller", caller)])).status
                        for _ in range(3)
                    ]
    assert statuses == {c: [200, 200, 429] for c in "abcd"}


@pytest.mark.parametrize(
    ("table", "path", "words"),
    [
        ({"cluster": True, "url": "redis://127.0.0.1:6379/2"}, "url", "only database 0"),
        (
            {"cluster": True, "sentinel_master": "m", "sentinel_nodes": ["127.0.0.1:1"]},
            "cluster",
            "no sentinels",
        ),
    ],
)
def test_bad_cluster_settings_name_their_key(table: dict[str, Any], path: str, words: str) -> None:
    from engine.schema import build

    with pytest.raises(ConfigError) as err:
        build(RedisConfig, table, "redis")
    assert err.value.path == f"redis.{path}"
    assert words in str(err.value)


# -- found by review: each of these failed before its fix ---------------------------------


async def test_one_failing_master_fails_only_its_own_callers() -> None:
    """A master gone (the others keep their slots): decisions on the others' slots go
    on, and the store's fail-fast holds only for the dead master's."""
    with trio.fail_after(DEADLINE):
        async with open_redis_cluster(3, ["--cluster-require-full-coverage", "no"]) as cluster:
            client = _cluster(cluster.url)
            store = RedisStore(client, prefix="t:", retry_interval=30.0)
            try:
                await _allowed(store, "warm")  # the map is known
                dead = cluster.nodes[0]
                by_node: dict[int, list[str]] = {n.port: [] for n in cluster.nodes}
                for i in range(60):
                    node = client.node_of(f"t:{{c{i}}}:x".encode())
                    assert node is not None
                    by_node[node[1]].append(f"c{i}")
                await dead.stop()
                healthy = [k for port, ks in by_node.items() if port != dead.port for k in ks]
                failed_first = False
                for k in by_node[dead.port][:1]:
                    try:
                        await _allowed(store, k)
                    except StoreUnavailable:
                        failed_first = True
                results = [await _allowed(store, k) for k in healthy]
            finally:
                await store.aclose()
    assert failed_first
    assert results == [True] * len(healthy)


async def test_tryagain_during_a_migration_is_sent_again() -> None:
    """A decision of two quotas (two keys, one slot) whose slot migrates gets TRYAGAIN
    until the migration ends; it is sent again, and succeeds, within its timeout."""
    two = Policy.build("", "sliding-window", [Quota(3, 60.0), Quota(10, 3600.0)])
    with trio.fail_after(DEADLINE):
        async with open_redis_cluster(3) as cluster:
            slot, _, _, target_id = await _start_migrating(cluster, b"t:{moving}")
            client = _cluster(cluster.url)
            store = RedisStore(client, prefix="t:", retry_interval=0.1)
            try:
                outcome = None

                async def decide() -> None:
                    nonlocal outcome
                    outcome = await store.decide("moving", two, trio.current_time())

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(decide)
                    await trio.sleep(0.2)  # (it is getting TRYAGAIN meanwhile)
                    for node in cluster.nodes:
                        await command(node.port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
            finally:
                await store.aclose()
    assert outcome is not None
    assert outcome.allowed


async def test_a_hung_cluster_fails_a_decision_within_its_timeout() -> None:
    with trio.fail_after(DEADLINE):
        async with open_redis_cluster(3) as cluster:
            client = RedisCluster(parse_redis_url(cluster.url), timeout=0.3, pool_size=2)
            store = RedisStore(client, prefix="t:", retry_interval=0.0)
            try:
                await _allowed(store, "warm")
                with _hung(*cluster.nodes):
                    client._mark_stale()  # a map to ask again, of nodes that never answer
                    started = trio.current_time()
                    with pytest.raises(StoreUnavailable):
                        await _allowed(store, "k")
                    took = trio.current_time() - started
            finally:
                await store.aclose()
    assert took < 1.0  # its timeout, 0.3 s, and slack for a busy machine; not (3 + 1) x 0.3


async def test_clusterdown_has_the_map_asked_again() -> None:
    with trio.fail_after(DEADLINE):
        async with open_redis_cluster(3) as cluster:
            client = _cluster(cluster.url)
            store = RedisStore(client, prefix="t:", retry_interval=0.0)
            try:
                await _allowed(store, "warm")
                owner = await cluster.owner(0)
                await command(owner.port, "CLUSTER", "DELSLOTS", 0)  # a slot nobody serves
                while True:  # until the node sees the cluster as failing
                    if b"cluster_state:fail" in await command(owner.port, "CLUSTER", "INFO"):
                        break
                    await trio.sleep(0.05)
                # A caller whose slot that node serves (it sees the cluster failing).
                key = _caller_of(client, owner)
                with pytest.raises(StoreUnavailable, match="CLUSTERDOWN"):
                    await _allowed(store, key)
                stale = client._stale
            finally:
                await store.aclose()
    assert stale


def test_a_slot_map_out_of_bounds_is_refused_and_replicas_are_remembered() -> None:
    client = _cluster("redis://127.0.0.1:7000/0")
    with pytest.raises(ValueError, match="out of bounds"):
        client._read_map(("127.0.0.1", 7000), [[-5, 3, [b"127.0.0.1", 7000, b"id"]]])
    with pytest.raises(ValueError, match="out of bounds"):
        client._read_map(("127.0.0.1", 7000), [[0, 20000, [b"127.0.0.1", 7000, b"id"]]])
    client._read_map(
        ("127.0.0.1", 7000),
        [[0, 16383, [b"127.0.0.1", 7000, b"m"], [b"127.0.0.1", 7001, b"r"]]],
    )
    assert client._masters == [("127.0.0.1", 7000)]
    assert ("127.0.0.1", 7001) in client._known  # asked for the map when the master is gone
    assert len(client._slots) == 16384


async def test_a_master_that_does_not_answer_has_the_map_asked_again() -> None:
    """A hung master never sends MOVED: its timeout must have the map asked again, or
    its callers would never find the replica promoted in its place."""
    with trio.fail_after(DEADLINE):
        async with open_redis_cluster(3) as cluster:
            client = RedisCluster(parse_redis_url(cluster.url), timeout=0.3, pool_size=2)
            store = RedisStore(client, prefix="t:", retry_interval=0.0)
            try:
                await _allowed(store, "warm")
                hung = cluster.nodes[1]
                key = _caller_of(client, hung)
                assert not client._stale
                with _hung(hung):
                    with pytest.raises(StoreUnavailable, match="no answer"):
                        await _allowed(store, key)
                    stale = client._stale
            finally:
                await store.aclose()
    assert stale


async def test_a_slot_migrating_past_the_timeout_is_no_outage_of_its_master() -> None:
    two = Policy.build("", "sliding-window", [Quota(3, 60.0), Quota(10, 3600.0)])
    with trio.fail_after(DEADLINE):
        async with open_redis_cluster(3) as cluster:
            slot, source, _, _ = await _start_migrating(cluster, b"t:{moving}")
            client = RedisCluster(parse_redis_url(cluster.url), timeout=0.3, pool_size=2)
            store = RedisStore(client, prefix="t:", retry_interval=30.0)
            try:
                with pytest.raises(StoreUnavailable, match="TRYAGAIN"):
                    await store.decide("moving", two, trio.current_time())
                available = store.available
                # Another caller of the same master, on a slot that does not migrate.
                other = _caller_of(client, source, not_in_slot=slot)
                allowed = await _allowed(store, other)
            finally:
                await store.aclose()
    assert available
    assert allowed


async def test_outages_recorded_under_an_older_map_are_forgotten() -> None:
    with trio.fail_after(DEADLINE):
        async with open_redis_cluster(3) as cluster:
            client = RedisCluster(parse_redis_url(cluster.url), timeout=0.3, pool_size=2)
            store = RedisStore(client, prefix="t:", retry_interval=30.0)
            try:
                await _allowed(store, "warm")
                hung = cluster.nodes[2]
                key = _caller_of(client, hung)
                with _hung(hung):
                    with pytest.raises(StoreUnavailable):
                        await _allowed(store, key)
                with pytest.raises(StoreUnavailable, match="retrying shortly"):
                    await _allowed(store, key)  # failing fast, for retry_interval
                client.generation += 1  # the map changed (a failover, a resharding)
                allowed = await _allowed(store, key)
            finally:
                await store.aclose()
    assert allowed


async def test_stores_sharing_a_cluster_have_one_refresher_and_one_warning(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Ten routes with the same Redis settings share one cluster: while no node gives
    the map, one of them asks for it every 0.1 s, and says so once, not ten times."""
    from engine.testing import free_port

    client = _cluster(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    asked = 0
    ask = client._map

    async def counted() -> None:
        nonlocal asked
        asked += 1
        await ask()

    client._map = counted  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="filtergate.plugins.rate-limit"):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(client.serve)
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if "slot map" in r.getMessage()]
    assert 5 <= asked <= 12  # about one ask per 0.1 s, not ten
    assert len(warnings) == 1


async def test_a_map_that_no_node_gives_in_time_is_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(DEADLINE):
        async with open_redis_cluster(3) as cluster:
            client = RedisCluster(parse_redis_url(cluster.url), timeout=0.3, pool_size=2)
            store = RedisStore(client, prefix="t:", retry_interval=0.0)
            try:
                await _allowed(store, "warm")
                with _hung(*cluster.nodes):
                    with caplog.at_level("WARNING", logger="filtergate.plugins.rate-limit"):
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(client.serve)
                            client._mark_stale()
                            with trio.fail_after(5):
                                while True:  # until the refresher says it cannot
                                    if any("within" in r.getMessage() for r in caplog.records):
                                        break
                                    await trio.sleep(0.05)
                            nursery.cancel_scope.cancel()
            finally:
                await store.aclose()
