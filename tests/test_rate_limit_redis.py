"""The rate-limit plugin's Redis store against a real, private redis-server.

Real sockets and the real clock (Redis' TIME cannot be mocked), so every test keeps
its windows long and its deadlines short.
"""

from __future__ import annotations

import json
import logging
import ssl
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from engine.metrics import counter
from engine.schema import Invalid
from plugins.rate_limit import RedisConfig
from plugins.rate_limit.algorithms import Quota
from plugins.rate_limit.redis import (
    RedisPool,
    RedisReplyError,
    RedisStore,
    RedisUnavailable,
    parse_redis_url,
)
from plugins.rate_limit.store import Policy, StoreUnavailable
from tests.redis_server import RedisServer, command, open_redis_server

ROOT = str(Path(__file__).resolve().parent.parent)
ALGORITHMS = ["sliding-window", "sliding-log", "token-bucket"]


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with open_redis_server() as server:
        yield server


@asynccontextmanager
async def open_store(
    url: str, *, command_timeout: float = 1.0, pool_size: int = 8, retry_interval: float = 0.1
) -> AsyncIterator[RedisStore]:
    pool = RedisPool(parse_redis_url(url), timeout=command_timeout, pool_size=pool_size)
    store = RedisStore(pool, prefix="test:", retry_interval=retry_interval)
    try:
        yield store
    finally:
        await store.aclose()


async def test_parse_url() -> None:
    a = parse_redis_url("redis://user:p%40ss@10.1.2.3:6380/4")
    assert (a.host, a.port, a.db, a.username, a.password) == ("10.1.2.3", 6380, 4, "user", "p@ss")
    a = parse_redis_url("redis://:pw@localhost", password="other")
    assert (a.host, a.port, a.db, a.username, a.password) == ("localhost", 6379, 0, None, "other")
    assert not a.tls
    with pytest.raises(ValueError, match="database number") as garbled:  # "/" unencoded
        parse_redis_url("redis://u:12/hunter2@h/0")
    assert "hunter2" not in str(garbled.value)
    a = parse_redis_url("rediss://cache.internal:6380/1")
    assert (a.host, a.port, a.db, a.tls) == ("cache.internal", 6380, 1, True)
    with pytest.raises(ValueError, match="rediss://"):
        parse_redis_url("http://x")
    # An error names the URL, but never its password (it ends up in logs and terminals).
    for bad in ("redis://:hunter2@host:99999", "redis://u:hunter2@/0", "redis://u:hunter2@h/0?x"):
        with pytest.raises(ValueError, match=r":\*\*\*@") as info:
            parse_redis_url(bad)
        assert "hunter2" not in str(info.value)


async def test_client_commands_and_errors(redis: RedisServer) -> None:
    with trio.fail_after(10):
        pool = RedisPool(parse_redis_url(redis.url), timeout=1.0, pool_size=2)
        try:
            assert await pool.execute("PING") == b"PONG"
            assert await pool.execute("SET", "k", b"v\r\n\x00") == b"OK"
            assert await pool.execute("GET", "k") == b"v\r\n\x00"
            assert await pool.execute("GET", "missing") is None
            assert await pool.execute("INCRBY", "n", 5) == 5
            with pytest.raises(RedisReplyError, match=r"WRONGTYPE|ERR"):
                await pool.execute("LPUSH", "k", "x")
            # The connection that carried an error reply is still good.
            assert await pool.execute("INCR", "n") == 6
        finally:
            await pool.aclose()


async def test_tls_checks_the_server_certificate() -> None:
    ca, stranger = trustme.CA(), trustme.CA()
    with trio.fail_after(10):
        async with open_redis_server(tls=ca) as server:
            trusting = ssl.create_default_context()
            ca.configure_trust(trusting)
            pool = RedisPool(
                parse_redis_url(server.url), timeout=2.0, pool_size=1, ssl_context=trusting
            )
            assert await pool.execute("PING") in (b"PONG", "PONG")
            assert await pool.execute("INCR", "n") == 1
            await pool.aclose()
            doubting = ssl.create_default_context()
            stranger.configure_trust(doubting)
            pool = RedisPool(
                parse_redis_url(server.url), timeout=2.0, pool_size=1, ssl_context=doubting
            )
            with pytest.raises(RedisUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await pool.execute("PING")
            await pool.aclose()
            # Plain RESP to a TLS-only port gets no answer, never a reply.
            plain = server.url.replace("rediss://", "redis://")
            pool = RedisPool(parse_redis_url(plain), timeout=0.5, pool_size=1)
            with pytest.raises(RedisUnavailable):
                await pool.execute("PING")
            await pool.aclose()


async def test_a_client_certificate_for_a_server_that_asks(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = ca.issue_cert("filtergate")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    with trio.fail_after(10):
        async with open_redis_server(tls=ca, client_certs=True) as server:
            config = RedisConfig(
                url=server.url,
                ca_file=str(tmp_path / "ca.pem"),
                cert_file=str(tmp_path / "client.pem"),
                key_file=str(tmp_path / "client.key"),
            )
            pool = RedisPool(
                parse_redis_url(server.url),
                timeout=2.0,
                pool_size=1,
                ssl_context=config.tls_context(),
            )
            assert await pool.execute("INCR", "n") == 1
            await pool.aclose()
            anonymous = RedisConfig(url=server.url, ca_file=str(tmp_path / "ca.pem"))
            pool = RedisPool(
                parse_redis_url(server.url),
                timeout=2.0,
                pool_size=1,
                ssl_context=anonymous.tls_context(),
            )
            with pytest.raises(RedisUnavailable):
                await pool.execute("PING")
            await pool.aclose()


def test_a_tls_file_replaced_on_disk_makes_a_new_config(tmp_path: Path) -> None:
    """The engine keeps a filter instance while its config compares equal: a CA bundle
    rotated under the same path must not keep the old one in use after a reload."""
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    before = RedisConfig(url="rediss://127.0.0.1/0", ca_file=str(path))
    assert before == RedisConfig(url="rediss://127.0.0.1/0", ca_file=str(path))
    trustme.CA().cert_pem.write_to_path(str(path))
    assert before != RedisConfig(url="rediss://127.0.0.1/0", ca_file=str(path))
    assert str(path.read_bytes()[30:60]) not in repr(before)


def test_ca_file_config_errors(tmp_path: Path) -> None:
    with pytest.raises(Invalid) as info:
        RedisConfig(url="redis://127.0.0.1/0", ca_file=str(tmp_path / "ca.pem"))
    assert info.value.key == "ca_file"
    assert "rediss://" in info.value.message
    with pytest.raises(Invalid) as info:
        RedisConfig(url="rediss://127.0.0.1/0", ca_file=str(tmp_path / "missing.pem"))
    assert info.value.key == "ca_file"
    assert "cannot read" in info.value.message
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(Invalid) as info:
        RedisConfig(url="rediss://127.0.0.1/0", ca_file=str(tmp_path / "junk.pem"))
    assert info.value.key == "ca_file"
    assert "cannot load" in info.value.message
    with pytest.raises(Invalid) as info:
        RedisConfig(url="redis://127.0.0.1/0", cert_file=str(tmp_path / "junk.pem"))
    assert info.value.key == "cert_file"
    with pytest.raises(Invalid) as info:
        RedisConfig(url="rediss://127.0.0.1/0", key_file=str(tmp_path / "junk.pem"))
    assert info.value.key == "key_file"
    with pytest.raises(Invalid) as info:
        RedisConfig(url="rediss://127.0.0.1/0", cert_file=str(tmp_path / "junk.pem"))
    assert (info.value.key, "cannot load" in info.value.message) == ("cert_file", True)


async def test_auth_and_database_from_the_url() -> None:
    with trio.fail_after(10):
        async with open_redis_server(password="s3cret") as server:
            no_auth = RedisPool(
                parse_redis_url(f"redis://127.0.0.1:{server.port}/0"), timeout=1.0, pool_size=1
            )
            with pytest.raises(RedisReplyError, match="NOAUTH"):
                await no_auth.execute("PING")
            await no_auth.aclose()
            wrong = RedisPool(
                parse_redis_url(server.url, password="wrong"), timeout=1.0, pool_size=1
            )
            with pytest.raises(RedisUnavailable, match="set-up refused"):
                await wrong.execute("PING")
            await wrong.aclose()
            db3 = RedisPool(
                parse_redis_url(server.url.replace("/0", "/3")), timeout=1.0, pool_size=1
            )
            db0 = RedisPool(parse_redis_url(server.url), timeout=1.0, pool_size=1)
            await db3.execute("SET", "where", "three")
            assert await db0.execute("GET", "where") is None
            assert await db3.execute("GET", "where") == b"three"
            await db3.aclose()
            await db0.aclose()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_decisions_and_headers_values(redis: RedisServer, algorithm: str) -> None:
    with trio.fail_after(10):
        policy = Policy.build("", algorithm, [Quota(3, 60.0), Quota(100, 3600.0)])
        async with open_store(redis.url) as store:
            outcomes = [await store.decide("k", policy, 0.0) for _ in range(5)]
            assert [o.allowed for o in outcomes] == [True, True, True, False, False]
            assert [o.remaining for o in outcomes[:3]] == [2, 1, 0]
            assert all(o.quota.limit == 3 for o in outcomes)
            refused = outcomes[3]
            # (The counter may make a caller wait into the next window: up to 2 windows.)
            assert 0 < refused.retry_after <= 120.0
            assert refused.retry_after <= refused.reset <= 120.0
            # Another key is untouched; the hourly quota counted only the admitted three.
            assert (await store.decide("other", policy, 0.0)).remaining == 2
            # The same quota under the same key is the same counter, whatever else the
            # policy holds: it counted the three admitted requests, not the refused two.
            hourly = Policy.build("", algorithm, [Quota(100, 3600.0)])
            assert (await store.decide("k", hourly, 0.0)).remaining == 96


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_window_passes_on_the_server_clock(redis: RedisServer, algorithm: str) -> None:
    with trio.fail_after(10):
        policy = Policy.build("", algorithm, [Quota(2, 0.2)])
        async with open_store(redis.url) as store:
            assert [(await store.decide("k", policy, 0.0)).allowed for _ in range(3)] == [
                True,
                True,
                False,
            ]
            await trio.sleep(0.45)  # real time: the server's clock must move
            assert (await store.decide("k", policy, 0.0)).allowed


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_concurrent_decisions_on_one_key_never_exceed_the_limit(
    redis: RedisServer, algorithm: str
) -> None:
    with trio.fail_after(20):
        policy = Policy.build("", algorithm, [Quota(50, 60.0)])
        results: list[bool] = []
        async with open_store(redis.url, command_timeout=5.0) as store:

            async def one() -> None:
                results.append((await store.decide("hot", policy, 0.0)).allowed)

            async with trio.open_nursery() as nursery:
                for _ in range(300):
                    nursery.start_soon(one)
        assert len(results) == 300
        assert results.count(True) == 50


async def test_two_stores_with_separate_pools_share_one_limit(redis: RedisServer) -> None:
    with trio.fail_after(20):
        policy = Policy.build("", "sliding-window", [Quota(40, 60.0)])
        counts = [0, 0]
        async with open_store(redis.url) as a, open_store(redis.url) as b:
            assert a.pool is not b.pool

            async def hammer(i: int, store: RedisStore) -> None:
                for _ in range(50):
                    allowed = (await store.decide("shared", policy, 0.0)).allowed
                    counts[i] += allowed

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hammer, 0, a)
                nursery.start_soon(hammer, 1, b)
        assert sum(counts) == 40
        assert min(counts) > 0


_WORKER = textwrap.dedent(
    """
    import json, sys, trio
    from plugins.rate_limit.algorithms import Quota
    from plugins.rate_limit.redis import RedisPool, RedisStore, parse_redis_url
    from plugins.rate_limit.store import Policy

    async def main(url, algorithm):
        pool = RedisPool(parse_redis_url(url), timeout=5.0, pool_size=4)
        store = RedisStore(pool, prefix="test:", retry_interval=0.1)
        policy = Policy.build("", algorithm, [Quota(60, 60.0)])
        admitted = 0
        async def one():
            nonlocal admitted
            allowed = (await store.decide("procs", policy, 0.0)).allowed
            admitted += allowed
        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(one)
        await store.aclose()
        sys.stdout.write(json.dumps(admitted))

    trio.run(main, sys.argv[1], sys.argv[2])
    """
)


@pytest.mark.parametrize("algorithm", ["sliding-window", "sliding-log"])
async def test_two_processes_share_one_limit(redis: RedisServer, algorithm: str) -> None:
    """Two OS processes, each with its own store and pool, enforce one combined limit."""
    with trio.fail_after(30):
        results: list[int] = []

        async def worker() -> None:
            done = await trio.run_process(
                [sys.executable, "-c", _WORKER, redis.url, algorithm],
                capture_stdout=True,
                capture_stderr=True,
                cwd=ROOT,
            )
            results.append(json.loads(done.stdout))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker)
            nursery.start_soon(worker)
        assert sum(results) == 60


async def test_script_cache_flushed_falls_back_to_eval(redis: RedisServer) -> None:
    with trio.fail_after(10):
        policy = Policy.build("", "sliding-log", [Quota(5, 60.0)])
        async with open_store(redis.url) as store:
            assert (await store.decide("k", policy, 0.0)).remaining == 4
            assert await store.pool.execute("SCRIPT", "FLUSH") == b"OK"
            assert (await store.decide("k", policy, 0.0)).remaining == 3
            assert (await store.decide("k", policy, 0.0)).remaining == 2


async def test_keys_expire_on_the_server(redis: RedisServer) -> None:
    with trio.fail_after(10):
        async with open_store(redis.url) as store:
            for algorithm in ALGORITHMS:
                await store.decide("k", Policy.build("", algorithm, [Quota(5, 60.0)]), 0.0)
            keys = await store.pool.execute("KEYS", "test:*")
            assert len(keys) == 3
            for key in keys:
                assert key.startswith(b"test:{k}:")
                ttl = await store.pool.execute("PTTL", key)
                assert 0 < ttl <= 121_000


async def serve_silence(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A TCP server that accepts and reads, and never answers: a hung Redis."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            while await stream.receive_some(65536):
                pass

    async with trio.open_nursery() as nursery:
        task_status.started(port)
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


async def test_a_silent_server_costs_one_timeout_then_fails_fast() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_silence)
            policy = Policy.build("", "sliding-window", [Quota(5, 60.0)])
            async with open_store(
                f"redis://127.0.0.1:{port}/0", command_timeout=0.2, retry_interval=0.5
            ) as store:
                start = trio.current_time()
                with pytest.raises(StoreUnavailable, match=r"no answer within 0\.2s"):
                    await store.decide("k", policy, trio.current_time())
                assert 0.19 < trio.current_time() - start < 1.0
                assert not store.available
                # Within retry_interval, decisions fail at once, touching no socket.
                start = trio.current_time()
                for _ in range(100):
                    with pytest.raises(StoreUnavailable, match="retrying shortly"):
                        await store.decide("k", policy, trio.current_time())
                assert trio.current_time() - start < 0.1
            nursery.cancel_scope.cancel()


async def test_redis_stopped_mid_traffic_then_restarted(redis: RedisServer) -> None:
    """fail-open or fail-closed meanwhile, nothing hangs, the limit holds again after."""
    with trio.fail_after(20):
        policy = Policy.build("", "sliding-log", [Quota(5, 60.0)])
        async with open_store(redis.url, command_timeout=0.2, retry_interval=0.1) as store:
            assert [(await store.decide("k", policy, 0.0)).allowed for _ in range(6)] == [
                *[True] * 5,
                False,
            ]
            await redis.stop()
            failed = 0
            start = trio.current_time()
            for _ in range(50):
                try:
                    await store.decide("k", policy, trio.current_time())
                except StoreUnavailable:
                    failed += 1
                await trio.sleep(0.01)
            assert failed == 50
            assert trio.current_time() - start < 5.0  # bounded: nothing waited long
            await redis.start()  # same port, empty data
            await trio.sleep(0.15)  # past retry_interval
            outcomes: list[bool] = []
            with trio.fail_after(5):
                while len(outcomes) < 6:
                    try:
                        outcomes.append(
                            (await store.decide("k", policy, trio.current_time())).allowed
                        )
                    except StoreUnavailable:
                        await trio.sleep(0.05)
            assert outcomes == [*[True] * 5, False]
            assert store.available


async def test_filter_with_redis_end_to_end_of_the_phases(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The filter itself on the Redis store: limit, failure policy, recovery."""
    from tests.test_rate_limit import attempt, make_filter

    caplog.set_level(logging.DEBUG, logger="filtergate.plugins.rate-limit")

    with trio.fail_after(20):
        f = make_filter(
            store="redis",
            failure="fail_closed",
            algorithm="sliding-log",
            limits=[{"limit": 3, "window": "1m"}],
            redis={"url": redis.url, "timeout": "200ms", "retry_interval": "100ms"},
        )
        await f.setup()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(f.background)
            assert [(await attempt(f))[0] for _ in range(4)] == [True, True, True, False]
            await redis.stop()
            failures = counter("filtergate_rate_limit_store_failures_total", "")
            before = failures.value(store="redis", policy="fail_closed")
            from plugins.rate_limit import RateLimitUnavailable

            for _ in range(3):
                with pytest.raises(RateLimitUnavailable):
                    await attempt(f)
            assert failures.value(store="redis", policy="fail_closed") == before + 3
            assert sum("refusing" in r.getMessage() for r in caplog.records) == 3
            await redis.start()
            await trio.sleep(0.15)
            assert [(await attempt(f))[0] for _ in range(4)] == [True, True, True, False]
            nursery.cancel_scope.cancel()


async def test_instances_with_the_same_redis_share_one_pool(redis: RedisServer) -> None:
    """Each route's own limits make an instance each: with one pool per instance, 50
    routes held 50 x pool_size connections per process. Instances with the same Redis
    settings share a pool; the last one to go closes its idle connections, and the
    pool still serves an instance that comes later (a reload's)."""
    from tests.test_rate_limit import attempt, make_filter

    def limited(limit: int, **redis: Any) -> Any:
        table = {"url": redis.pop("url", None) or server_url, "pool_size": 2, **redis}
        return make_filter(store="redis", limits=[{"limit": limit, "window": "1m"}], redis=table)

    server_url = redis.url
    with trio.fail_after(20):
        a, b = limited(10), limited(20, key_prefix="other:")
        assert a.store.pool is b.store.pool
        assert limited(10, pool_size=3).store.pool is not a.store.pool
        pool = a.store.pool
        async with trio.open_nursery() as nursery:
            scopes = []
            for f in (a, b):
                scope = trio.CancelScope()
                scopes.append(scope)

                async def hold(f: Any = f, scope: trio.CancelScope = scope) -> None:
                    with scope:
                        await f.background()

                nursery.start_soon(hold)
            async with trio.open_nursery() as burst:  # both at once: at most pool_size
                for f in (a, b) * 10:
                    burst.start_soon(attempt, f)
            clients = (await command(redis.port, "CLIENT", "LIST")).count(b"cmd=evalsha")
            assert clients <= 2
            scopes[0].cancel()  # one instance goes: the other's connections stay
            await trio.sleep(0.05)
            assert pool._idle
            assert (await attempt(b))[0]
            scopes[1].cancel()  # the last one goes: its idle connections are closed
            await trio.sleep(0.05)
            assert not pool._idle
        later = limited(30)  # a reload's instance: the same pool, serving again
        assert later.store.pool is pool
        assert (await attempt(later))[0]
        await pool.aclose()
