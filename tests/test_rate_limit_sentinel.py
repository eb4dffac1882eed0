"""rate-limit on Redis Sentinel, and a master demoted by a failover, against real
redis-server processes (masters, replicas, a sentinel) on 127.0.0.1.

Real sockets and the real clock: a sentinel's failover takes real seconds, so every
test waits for conditions, never for fixed times, within its own deadline.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from engine.schema import Invalid
from engine.testing import Stubs, free_port, http_request, open_gateway
from plugins.rate_limit import RedisConfig
from plugins.rate_limit.algorithms import Quota
from plugins.rate_limit.redis import (
    RedisPool,
    RedisStore,
    Sentinels,
    parse_redis_url,
    parse_sentinel_node,
)
from plugins.rate_limit.store import Policy, StoreUnavailable
from tests.redis_server import command, open_redis_server, open_sentinel_group
from tests.test_timeouts import _Names

DEADLINE = 30
POLICY = Policy.build("", "sliding-log", [Quota(6, 60.0)])


@asynccontextmanager
async def open_store(pool: RedisPool, *, watch: bool = False) -> AsyncIterator[RedisStore]:
    """A store on ``pool``; with ``watch``, the pool follows the sentinels meanwhile."""
    store = RedisStore(pool, prefix="test:", retry_interval=0.1)
    try:
        async with trio.open_nursery() as nursery:
            if watch:
                nursery.start_soon(pool.watch)
            yield store
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


def sentinel_pool(master: str, *ports: int) -> RedisPool:
    nodes = tuple(("127.0.0.1", p) for p in ports)
    return RedisPool(
        parse_redis_url("redis:///0", host_required=False),
        timeout=1.0,
        pool_size=4,
        sentinels=Sentinels(master, nodes),
    )


async def decide(store: RedisStore) -> bool:
    return (await store.decide("k", POLICY, trio.current_time())).allowed


async def count_on(port: int) -> int:
    """The requests counted under the test key on the server at ``port``."""
    keys = await command(port, "KEYS", "test:*")
    return int(await command(port, "ZCARD", keys[0])) if keys else 0


async def until_decided(store: RedisStore) -> bool:
    """The first decision the store makes, failing ones retried every 50 ms."""
    while True:
        try:
            return await decide(store)
        except StoreUnavailable:
            await trio.sleep(0.05)


async def test_a_master_demoted_to_replica_is_left_for_where_the_name_points() -> None:
    """A managed Redis' primary endpoint after a failover: the name now points at the
    new primary, while the pooled connections still reach the old one, a read-only
    replica now. The READONLY reply closes them all, and the next connection looks the
    name up again (before, every decision failed until the gateway restarted)."""
    with trio.fail_after(DEADLINE):
        async with open_redis_server() as old, open_redis_server() as new:
            # redis.test is wherever the dict says: a name whose address moves.
            names: dict[str, list[tuple[str, int]] | None] = {
                "redis.test": [("127.0.0.1", old.port)]
            }
            trio.socket.set_custom_hostname_resolver(_Names(names))
            pool = RedisPool(parse_redis_url("redis://redis.test/0"), timeout=1.0, pool_size=4)
            async with open_store(pool) as store:
                async with trio.open_nursery() as nursery:  # several pooled connections
                    for _ in range(4):
                        nursery.start_soon(decide, store)
                assert await count_on(old.port) == 4
                await command(old.port, "REPLICAOF", "127.0.0.1", new.port)
                names["redis.test"] = [("127.0.0.1", new.port)]
                with pytest.raises(StoreUnavailable, match="read-only replica"):
                    await decide(store)
                assert await until_decided(store)
                assert [await decide(store) for _ in range(5)] == [True] * 5
                assert await count_on(new.port) == 6
                assert await decide(store) is False  # the limit holds on the new primary


async def test_the_sentinels_name_the_master_and_a_failover_is_followed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first sentinel is down; the second names the master. After a failover the
    pool moves to the new master within a poll, no decision failing, and the counts
    the replica had go on."""
    caplog.set_level(logging.WARNING, logger="filtergate.plugins.rate-limit")
    with trio.fail_after(DEADLINE):
        async with open_sentinel_group("fg") as group:
            pool = sentinel_pool("fg", free_port(), group.sentinel.port)
            async with open_store(pool, watch=True) as store:
                assert [await decide(store) for _ in range(3)] == [True] * 3
                assert pool.where.endswith(f"(at 127.0.0.1:{group.master.port})")
                assert await count_on(group.master.port) == 3
                await group.wait_replicated()
                await group.failover()
                while True:  # the watcher asks every SENTINEL_POLL (1 s)
                    if pool.where.endswith(f"(at 127.0.0.1:{group.replica.port})"):
                        break
                    await trio.sleep(0.05)
                assert [await decide(store) for _ in range(4)] == [True, True, True, False]
                assert await count_on(group.replica.port) == 6
                assert store.available
            moved = f"moved from 127.0.0.1:{group.master.port} to 127.0.0.1:{group.replica.port}"
            assert moved in caplog.text


async def test_a_dead_master_is_left_once_the_sentinels_fail_over() -> None:
    """The master dies. Until the sentinel promotes the replica (its down-after is 1 s),
    decisions fail fast; the first after the promotion reaches the new master. No
    watcher runs here: a failed connection alone makes the pool ask again."""
    with trio.fail_after(DEADLINE):
        async with open_sentinel_group("fg") as group:
            pool = sentinel_pool("fg", group.sentinel.port)
            async with open_store(pool) as store:
                assert await decide(store)
                await group.wait_replicated()
                await group.master.stop()
                with pytest.raises(StoreUnavailable):
                    await decide(store)
                assert await until_decided(store)
                assert pool.where.endswith(f"(at 127.0.0.1:{group.replica.port})")
                assert await count_on(group.replica.port) == 2


async def test_an_address_that_is_no_master_is_not_used() -> None:
    """A sentinel naming a replica (its view is stale during a failover): the ROLE
    check refuses the connection, and the next one asks the sentinels again."""

    async def stale_sentinel(stream: trio.SocketStream) -> None:
        port = str(replica.port).encode()
        while await stream.receive_some(4096):
            await stream.send_all(b"*2\r\n$9\r\n127.0.0.1\r\n$%d\r\n%s\r\n" % (len(port), port))

    with trio.fail_after(DEADLINE):
        async with open_redis_server() as master:
            async with open_redis_server(
                args=["--replicaof", "127.0.0.1", str(master.port)]
            ) as replica:
                async with trio.open_nursery() as nursery:
                    listeners = await nursery.start(
                        functools.partial(trio.serve_tcp, stale_sentinel, 0, host="127.0.0.1")
                    )
                    port = listeners[0].socket.getsockname()[1]
                    async with open_store(sentinel_pool("fg", port)) as store:
                        for _ in range(2):
                            with pytest.raises(StoreUnavailable, match="is not a master"):
                                await decide(store)
                            await trio.sleep(0.15)  # past retry_interval
                    assert await count_on(replica.port) == 0
                    nursery.cancel_scope.cancel()


async def test_a_sentinel_that_hangs_does_not_hide_the_others() -> None:
    """The first sentinel accepts and never answers: it gets its share of the decision's
    time, the next one names the master, and is asked first from then on."""
    with trio.fail_after(DEADLINE):
        async with open_sentinel_group("fg") as group:
            hung = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]  # never accepts
            pool = sentinel_pool("fg", hung.socket.getsockname()[1], group.sentinel.port)
            async with open_store(pool) as store:
                start = trio.current_time()
                assert await decide(store)
                assert trio.current_time() - start < 0.9  # its share: half of 1 s
                assert pool.where.endswith(f"(at 127.0.0.1:{group.master.port})")
            await hung.aclose()


async def test_with_no_sentinel_answering_the_master_known_serves_on() -> None:
    """The sentinels are gone, and the master drops its connections (a restart): the
    pool goes back to the master it knew (ROLE says it still is one)."""
    with trio.fail_after(DEADLINE):
        async with open_sentinel_group("fg") as group:
            pool = sentinel_pool("fg", group.sentinel.port)
            async with open_store(pool) as store:
                assert await decide(store)
                await group.sentinel.stop()
                await group.master.stop()
                with pytest.raises(StoreUnavailable):
                    await decide(store)
                await group.master.start()  # same port, empty data
                assert await until_decided(store)
                assert pool.where.endswith(f"(at 127.0.0.1:{group.master.port})")
                assert await count_on(group.master.port) == 1


async def test_a_redis_6_script_error_saying_readonly_drops_the_connection() -> None:
    """Before Redis 7 a script's write refused by a replica comes back wrapped in the
    script's error; it is a READONLY all the same (a server that speaks it here)."""
    connections = 0
    error = (
        b"-ERR Error running script (call to f_0123): @user_script:4: @user_script: 4: "
        b"-READONLY You can't write against a read only replica.\r\n"
    )

    async def replica(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        while await stream.receive_some(65536):
            await stream.send_all(error)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, replica, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            pool = RedisPool(
                parse_redis_url(f"redis://127.0.0.1:{port}/0"), timeout=1.0, pool_size=4
            )
            async with open_store(pool) as store:
                for expected in (1, 2):
                    with pytest.raises(StoreUnavailable, match="read-only replica"):
                        await decide(store)
                    assert connections == expected  # each time a new connection
                    await trio.sleep(0.15)  # past retry_interval
            nursery.cancel_scope.cancel()


async def test_sentinels_that_do_not_name_the_master_say_why() -> None:
    with trio.fail_after(DEADLINE):
        async with open_sentinel_group("fg") as group:
            dead = free_port()
            async with open_store(sentinel_pool("other", dead, group.sentinel.port)) as store:
                with pytest.raises(StoreUnavailable) as caught:
                    await decide(store)
            message = str(caught.value)
            assert "no sentinel named the master" in message
            assert f"127.0.0.1:{dead}: " in message
            assert "Connection refused" in message
            assert f"127.0.0.1:{group.sentinel.port}: does not know 'other'" in message


def test_sentinel_config() -> None:
    config = RedisConfig(
        url="redis://:secret@/2",
        sentinel_master="fg",
        sentinel_nodes=("10.0.0.1", "10.0.0.2:26380", "[::1]:26381"),
        sentinel_password="s3",
    )
    assert config.sentinels() == Sentinels(
        "fg", (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26381)), None, "s3"
    )
    assert RedisConfig().sentinels() is None
    address = parse_redis_url(config.url, host_required=False)
    assert (address.password, address.db) == ("secret", 2)
    bad: list[tuple[dict[str, Any], str, str]] = [
        ({"sentinel_master": "fg"}, "sentinel_nodes", "give the sentinels"),
        ({"sentinel_master": " ", "sentinel_nodes": ("a",)}, "sentinel_master", "empty"),
        ({"sentinel_nodes": ("a",)}, "sentinel_nodes", "only used with sentinel_master"),
        ({"sentinel_password": "x"}, "sentinel_password", "only used with sentinel_master"),
        (
            {"sentinel_master": "fg", "sentinel_nodes": ("a:1", "a:x")},
            "sentinel_nodes[1]",
            "bad port",
        ),
        (
            {"sentinel_master": "fg", "sentinel_nodes": ("a:1",), "url": "rediss:///0"},
            "sentinel_master",
            "not supported with a rediss:// url",
        ),
        ({"url": "redis:///0"}, "url", "no host"),
        (
            {"sentinel_master": "fg", "sentinel_nodes": ("a",), "sentinel_username": "u"},
            "sentinel_username",
            "set sentinel_password too",
        ),
        ({"sentinel_master": "fg", "sentinel_nodes": ("a:0",)}, "sentinel_nodes[0]", "bad port"),
    ]
    for table, key, message in bad:
        with pytest.raises(Invalid, match=message) as caught:
            RedisConfig(**table)
        assert caught.value.key == key
    for node in ("a/b", "u@a:1", ":1", "a:1:2"):
        with pytest.raises(ValueError, match=r"expected|bad port"):
            parse_sentinel_node(node)


async def test_a_gateway_on_sentinel_follows_a_failover(stubs: Stubs) -> None:
    """Through a running gateway: the limit holds on the master the sentinel names, and
    after a failover the counts go to the new master (the filter's background task
    follows the sentinel)."""
    with trio.fail_after(DEADLINE):
        async with open_sentinel_group("fg") as group:
            table = {
                "limits": [{"limit": 3, "window": "1m"}],
                "algorithm": "sliding-log",
                "key": "route",
                "store": "redis",
                "redis": {
                    "url": "redis:///0",
                    "sentinel_master": "fg",
                    "sentinel_nodes": [f"127.0.0.1:{group.sentinel.port}"],
                    "timeout": "1s",
                    "key_prefix": "test:",
                },
            }
            config = {
                "upstreams": {"echo": {"targets": [stubs.target("echo")]}},
                "routes": [
                    {
                        "name": "r",
                        "prefix": "/",
                        "upstream": "echo",
                        "plugins": {"rate-limit": table},
                    }
                ],
            }
            async with open_gateway(config) as gw:
                statuses = [(await http_request(gw.port, "GET", "/")).status for _ in range(4)]
                assert statuses == [200, 200, 200, 429]
                assert await count_on(group.master.port) == 3
                await command(
                    group.master.port, "DEL", *await command(group.master.port, "KEYS", "*")
                )
                await group.wait_replicated()
                await group.failover()
                # Until the gateway follows, its requests still reach the old master.
                while await count_on(group.replica.port) == 0:
                    assert (await http_request(gw.port, "GET", "/")).status in (200, 429)
                    await trio.sleep(0.05)
                assert await count_on(group.replica.port) == 1
