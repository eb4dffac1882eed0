"""The rate-limit plugin end to end: through a running gateway, in memory and on a real
Redis, and two gateway processes (``filtergate run``) sharing one Redis limit."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trio
import trustme

from engine.schema import ConfigError
from engine.testing import HttpResponse, Stubs, http_request, open_gateway
from engine.testing import free_port as _free_port
from engine.testing import wait_listening as _wait_listening
from plugins.key_auth import hash_key
from tests.redis_server import RedisServer, open_redis_server

ROOT = Path(__file__).resolve().parent.parent


def gateway_config(stubs: Stubs, rate_limit: dict[str, Any]) -> dict[str, Any]:
    return {
        "upstreams": {"slow": {"targets": [stubs.target("slow")]}},
        "plugins": {
            "key-auth": {
                "allow_anonymous": True,
                "consumers": [
                    {"id": "alice", "key_sha256": hash_key("alice-key"), "groups": ["gold"]},
                    {"id": "bob", "key_sha256": hash_key("bob-key")},
                ],
            }
        },
        "routes": [
            {
                "name": "limited",
                "prefix": "/",
                "upstream": "slow",
                "plugins": {"rate-limit": rate_limit},
            }
        ],
    }


LIMITS = {
    "limits": [{"limit": 2, "window": "1m"}, {"limit": 100, "window": "1h"}],
    "groups": {"gold": {"limits": [{"limit": 4, "window": "1m"}]}},
    "legacy_headers": True,
}


async def get(port: int, key: str | None = None, client_ip: str = "127.0.0.1") -> HttpResponse:
    headers = [("x-api-key", key)] if key else []
    return await http_request(port, "GET", "/x?delay=0", headers=headers)


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_headers_and_429_through_the_gateway(stubs: Stubs, store: str) -> None:
    with trio.fail_after(20):
        async with open_redis_server() as redis:
            table: dict[str, Any] = {**LIMITS, "store": store}
            if store == "redis":
                table["redis"] = {"url": redis.url, "timeout": "500ms"}
            async with open_gateway(gateway_config(stubs, table)) as gw:
                first = await get(gw.port, "bob-key")
                assert first.status == 200
                assert first.header("ratelimit-limit") == "2"
                assert first.header("ratelimit-remaining") == "1"
                # Whole again once this minute's count has slid out: within 1-2 windows.
                assert 60 <= int(first.header("ratelimit-reset") or 0) <= 120
                assert first.header("ratelimit-policy") == "2;w=60, 100;w=3600"
                assert first.header("x-ratelimit-remaining") == "1"
                second = await get(gw.port, "bob-key")
                assert second.header("ratelimit-remaining") == "0"
                calls = stubs.slow.started

                refused = await get(gw.port, "bob-key")
                assert refused.status == 429
                retry_after = int(refused.header("retry-after") or 0)
                assert 1 <= retry_after <= 120
                assert refused.header("ratelimit-limit") == "2"
                assert refused.header("ratelimit-remaining") == "0"
                assert refused.header("ratelimit-policy") == "2;w=60, 100;w=3600"
                error = refused.json()["error"]
                assert error["status"] == 429
                assert error["code"] == "rate_limited"
                assert error["request_id"]
                assert "2 requests per 60s" in error["message"]
                assert stubs.slow.started == calls  # the upstream never saw it

                # The gold tier gets its own, larger quota.
                gold = [await get(gw.port, "alice-key") for _ in range(5)]
                assert [r.status for r in gold] == [200, 200, 200, 200, 429]
                assert gold[0].header("ratelimit-policy") == "4;w=60"
                # Anonymous callers are counted per client address.
                anonymous = [await get(gw.port) for _ in range(3)]
                assert [r.status for r in anonymous] == [200, 200, 429]


async def test_a_redis_over_tls(stubs: Stubs, tmp_path: Path) -> None:
    """rediss://: the counters are shared through a TLS-only Redis whose certificate is
    checked against ca_file; a server the CA did not vouch for is a store failure."""
    ca, stranger = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    stranger.cert_pem.write_to_path(str(tmp_path / "stranger.pem"))
    with trio.fail_after(20):
        async with open_redis_server(tls=ca) as redis:
            assert redis.url.startswith("rediss://")
            table: dict[str, Any] = {
                "limits": [{"limit": 2, "window": "1m"}],
                "store": "redis",
                "redis": {"url": redis.url, "ca_file": str(tmp_path / "ca.pem")},
            }
            async with open_gateway(gateway_config(stubs, table)) as gw:
                statuses = [(await get(gw.port, "bob-key")).status for _ in range(3)]
            assert statuses == [200, 200, 429]
            # The count is in Redis: a second gateway sees the spent quota at once.
            async with open_gateway(gateway_config(stubs, table)) as gw:
                assert (await get(gw.port, "bob-key")).status == 429
            # Another CA: the handshake fails, and fail_closed refuses with 503.
            table["redis"]["ca_file"] = str(tmp_path / "stranger.pem")
            table["failure"] = "fail_closed"
            async with open_gateway(gateway_config(stubs, table)) as gw:
                refused = await get(gw.port, "bob-key")
            assert refused.status == 503
            assert refused.json()["error"]["code"] == "rate_limit_unavailable"


async def test_config_errors_through_the_gateway(stubs: Stubs) -> None:
    with trio.fail_after(10):
        bad = {"limits": [{"limit": 10, "window": "soon"}]}
        with pytest.raises(ConfigError) as info:
            async with open_gateway(gateway_config(stubs, bad)):
                pass
        assert str(info.value) == (
            'routes[0].plugins.rate-limit.limits[0].window: expected a duration like "1m" '
            "(seconds, or a number with ms, s, m, h or d), got 'soon'"
        )


async def test_two_gateway_processes_share_one_redis_limit(stubs: Stubs, tmp_path: Path) -> None:
    """Two `filtergate run` processes behind one Redis enforce one combined limit."""
    with trio.fail_after(30):
        async with open_redis_server() as redis:
            ports = [_free_port(), _free_port()]
            processes: list[trio.Process] = []
            try:
                for i, port in enumerate(ports):
                    config: dict[str, Any] = gateway_config(
                        stubs,
                        {
                            "limits": [{"limit": 7, "window": "1m"}],
                            "algorithm": "sliding-log",
                            "key": ["route"],
                            "store": "redis",
                            "failure": "fail_closed",
                            "redis": {"url": redis.url, "timeout": "1s"},
                        },
                    )
                    config["server"] = {"listen": [f"127.0.0.1:{port}"]}
                    config["admin"] = {"listen": f"127.0.0.1:{_free_port()}"}
                    path = tmp_path / f"gateway{i}.toml"
                    path.write_text(tomli_w.dumps(config))
                    processes.append(
                        await trio.lowlevel.open_process(
                            [sys.executable, "-m", "engine.cli", "run", "-c", str(path)],
                            cwd=str(ROOT),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    )
                for port, process in zip(ports, processes, strict=True):
                    await _wait_listening(port, process)
                statuses = [(await get(ports[i % 2])).status for i in range(20)]
                assert statuses.count(200) == 7
                assert statuses.count(429) == 13
                # Both processes admitted some: the limit is shared, not per process.
                assert 200 in statuses[0::2]
                assert 200 in statuses[1::2]
            finally:
                for process in processes:
                    if process.poll() is None:
                        process.send_signal(signal.SIGTERM)
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    for process in processes:
                        await process.wait()
                for process in processes:
                    if process.poll() is None:
                        process.kill()


async def test_redis_stopped_under_a_running_gateway(stubs: Stubs) -> None:
    """fail_open: traffic flows while Redis is down, the limit is back after restart."""
    with trio.fail_after(20):
        async with open_redis_server() as redis:
            table = {
                "limits": [{"limit": 2, "window": "1m"}],
                "key": ["route"],
                "store": "redis",
                "redis": {"url": redis.url, "timeout": "200ms", "retry_interval": "100ms"},
            }
            async with open_gateway(gateway_config(stubs, table)) as gw:
                assert [(await get(gw.port)).status for _ in range(3)] == [200, 200, 429]
                await redis.stop()
                during = [await get(gw.port) for _ in range(5)]
                assert [r.status for r in during] == [200] * 5
                assert during[0].header("ratelimit-policy") == "2;w=60"
                assert during[0].header("ratelimit-remaining") is None
                await restart(redis)
                statuses = [(await get(gw.port)).status for _ in range(3)]
                assert statuses == [200, 200, 429]


async def restart(redis: RedisServer) -> None:
    await redis.start()
    await trio.sleep(0.15)  # past retry_interval: the next decision asks Redis again
