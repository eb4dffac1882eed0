"""rate-limit on a Redis Cluster: slots, redirections, and the gateway end to end,
against real redis-server processes in cluster mode on 127.0.0.1 (three masters).

Real sockets and the real clock: a cluster's nodes agree in real time, so tests wait
for conditions, never for fixed times, within their deadline.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from engine.schema import ConfigError
from engine.testing import Stubs, http_request, open_gateway
from plugins.rate_limit import RedisConfig
from plugins.rate_limit.algorithms import Quota
from plugins.rate_limit.redis import RedisCluster, RedisStore, key_slot, parse_redis_url
from plugins.rate_limit.store import Policy
from tests.redis_server import command, open_redis_cluster

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
            slot = key_slot(b"t:{fresh}")
            source = await cluster.owner(slot)
            target = next(n for n in cluster.nodes if n is not source)
            source_id, target_id = await cluster.node_id(source), await cluster.node_id(target)
            await command(target.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            await command(source.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
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
