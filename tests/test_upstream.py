"""Upstream pools end to end: 502/503/504, failover, balancing, health, outliers, reuse."""

from __future__ import annotations

import json
import socket
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from engine.testing import Client, Stubs, http_request, open_gateway, raw_exchange
from engine.upstream import _interleave_families
from plugins.key_auth import hash_key
from tests.upstreams import (
    Upstream,
    UpstreamConn,
    open_blackhole_upstream,
    open_counting_upstream,
    open_refusing_upstream,
    response_head,
    serve_upstream,
)


def _config(targets: list[Any], **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {"up": {"targets": targets, **upstream}},
        "routes": [{"name": "all", "prefix": "/", "upstream": "up"}],
    }


async def _sample(admin_port: int | None, series: str) -> float | None:
    """The value of one series (``name{labels}``) on the admin listener's /metrics."""
    assert admin_port is not None
    text = (await http_request(admin_port, "GET", "/metrics")).body.decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_refused_connection_is_502_then_503_while_ejected(autojump_clock: Any) -> None:
    """Also in the metrics: before, the target read healthy while ejected, and neither
    the refused connection nor the 503 was counted in upstream_requests_total."""

    with trio.fail_after(30):
        async with (
            open_refusing_upstream() as dead,
            open_gateway(_config([dead.target], eject_cooldown="10s")) as gw,
        ):
            healthy = f'filtergate_upstream_target_healthy{{upstream="up",target="{dead.target}"}}'
            requests = 'filtergate_upstream_requests_total{upstream="up",result="%s"}'
            errors = await _sample(gw.admin_port, requests % "connect_error") or 0.0
            none = await _sample(gw.admin_port, requests % "no_healthy_target") or 0.0
            assert await _sample(gw.admin_port, healthy) == 1
            first = await http_request(gw.port, "GET", "/")
            assert first.status == 502
            assert first.json()["error"]["code"] == "upstream_unreachable"
            assert await _sample(gw.admin_port, healthy) == 0  # out of rotation
            assert await _sample(gw.admin_port, requests % "connect_error") == errors + 1
            second = await http_request(gw.port, "GET", "/")
            assert second.status == 503
            assert second.json()["error"]["code"] == "no_healthy_target"
            assert await _sample(gw.admin_port, requests % "no_healthy_target") == none + 1
            await trio.sleep(11)  # the cooldown ends: the target is tried again
            assert await _sample(gw.admin_port, healthy) == 1
            assert (await http_request(gw.port, "GET", "/")).status == 502


async def test_an_upstream_that_closes_without_answering_counts_as_reset() -> None:
    async def hang_up(conn: UpstreamConn) -> None:
        await conn.read_request()  # and close

    with trio.fail_after(10):
        async with serve_upstream(hang_up) as up, open_gateway(_config([up.target])) as gw:
            series = 'filtergate_upstream_requests_total{upstream="up",result="reset"}'
            before = await _sample(gw.admin_port, series) or 0.0
            resp = await http_request(gw.port, "POST", "/", body=b"x")
            assert resp.status == 502
            assert resp.json()["error"]["code"] == "upstream_reset"
            assert await _sample(gw.admin_port, series) == before + 1


async def test_connect_failure_moves_to_another_target() -> None:
    with trio.fail_after(20):
        async with open_refusing_upstream() as dead, open_counting_upstream() as live:
            async with open_gateway(_config([dead.target, live.target])) as gw:
                statuses = [(await http_request(gw.port, "GET", f"/{i}")).status for i in range(6)]
            assert statuses == [200] * 6
            assert len(live.requests) == 6


async def test_read_timeout_is_504(stubs: Stubs, autojump_clock: Any) -> None:
    with trio.fail_after(30):
        async with open_gateway(_config([stubs.target("slow")], read_timeout="1s")) as gw:
            r = await http_request(gw.port, "GET", "/slow?delay=5")
            assert r.status == 504
            assert r.json()["error"]["code"] == "upstream_timeout"
            assert (await http_request(gw.port, "GET", "/slow?delay=0.1")).status == 200


async def test_route_timeout_overrides_the_upstream(stubs: Stubs, autojump_clock: Any) -> None:
    config = _config([stubs.target("slow")], read_timeout="60s")
    config["routes"][0]["timeout"] = "1s"
    with trio.fail_after(30):
        async with open_gateway(config) as gw:
            assert (await http_request(gw.port, "GET", "/slow?delay=3")).status == 504


async def test_pool_keeps_upstream_connections_alive() -> None:
    with trio.fail_after(20):
        async with open_counting_upstream() as up, open_gateway(_config([up.target])) as gw:
            for i in range(20):  # a new client connection each time
                assert (await http_request(gw.port, "GET", f"/{i}")).status == 200
            assert up.connections == 1
            assert len(up.requests) == 20


async def test_weighted_round_robin() -> None:
    with trio.fail_after(20):
        async with open_counting_upstream() as a, open_counting_upstream() as b:
            targets = [{"address": a.target, "weight": 3}, {"address": b.target, "weight": 1}]
            async with open_gateway(_config(targets)) as gw:
                for i in range(40):
                    await http_request(gw.port, "GET", f"/{i}")
            assert (len(a.requests), len(b.requests)) == (30, 10)


async def test_least_conn_and_random_use_every_target() -> None:
    for balance in ("least_conn", "random"):
        with trio.fail_after(20):
            async with open_counting_upstream() as a, open_counting_upstream() as b:
                async with open_gateway(_config([a.target, b.target], balance=balance)) as gw:

                    async def one(i: int, port: int) -> None:
                        assert (await http_request(port, "GET", f"/{i}")).status == 200

                    async with trio.open_nursery() as nursery:
                        for i in range(40):
                            nursery.start_soon(one, i, gw.port)
                assert len(a.requests) + len(b.requests) == 40
                assert a.requests, balance
                assert b.requests, balance


@pytest.mark.parametrize("balance", ["least_conn", "random"])
async def test_weights_hold_for_least_conn_and_random_at_light_load(balance: str) -> None:
    """One request at a time: every target is idle at each pick, and least active /
    weight tied at 0, so a 9:1 pool took requests about 1:1 (a canary got half)."""
    with trio.fail_after(20):
        async with open_counting_upstream() as a, open_counting_upstream() as b:
            targets = [{"address": a.target, "weight": 9}, {"address": b.target, "weight": 1}]
            async with open_gateway(_config(targets, balance=balance)) as gw:
                async with Client.open(gw.port) as client:
                    for i in range(200):
                        assert (await client.request("GET", f"/{i}")).status == 200
    # least_conn is exact (180:20); random draws by weight (sd about 4)
    assert 165 <= len(a.requests) <= 195, balance
    assert len(a.requests) + len(b.requests) == 200


async def test_health_checks_take_a_target_out_and_back(autojump_clock: Any) -> None:
    hc = {"path": "/healthz", "interval": "1s", "unhealthy_threshold": 2, "healthy_threshold": 1}
    with trio.fail_after(60):
        async with open_counting_upstream() as live, open_refusing_upstream() as dead:
            async with open_gateway(_config([live.target, dead.target], health_check=hc)) as gw:
                await trio.sleep(3.5)
                snap = await _admin(gw.admin_port, "/upstreams")
                health = {t["address"]: t["healthy"] for t in snap["up"]["targets"]}
                assert health == {live.target: True, dead.target: False}
                for i in range(10):
                    assert (await http_request(gw.port, "GET", f"/{i}")).status == 200


async def test_outlier_ejection_and_return(stubs: Stubs, autojump_clock: Any) -> None:
    outlier = {"consecutive_failures": 2, "base_ejection": "30s", "max_ejected_percent": 50}
    config = _config([stubs.target("flaky"), stubs.target("echo")], outlier=outlier)
    with trio.fail_after(120):
        async with open_gateway(config) as gw:
            seen: Counter[int] = Counter()
            for _ in range(12):
                seen[(await http_request(gw.port, "GET", "/x?rate=1")).status] += 1
            # Two 500s from the flaky target eject it; then only echo answers.
            assert seen[500] == 2
            assert seen[200] == 10
            await trio.sleep(31)  # the ejection ends: the flaky target is back
            statuses = {(await http_request(gw.port, "GET", "/x?rate=1")).status for _ in range(2)}
            assert 500 in statuses


async def test_ipv6_listener(stubs: Stubs) -> None:
    config = _config([stubs.target("echo")])
    config["server"] = {"listen": ["[::1]:0", "127.0.0.1:0"]}
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            v6 = await http_request(gw.gateway.ports[0], "GET", "/v6", address="::1")
            v4 = await http_request(gw.gateway.ports[1], "GET", "/v4")
            assert (v6.status, v4.status) == (200, 200)
            assert v6.json()["headers"]["x-forwarded-for"] == "::1"


async def _admin(port: int | None, path: str) -> Any:
    assert port is not None
    r = await http_request(port, "GET", path)
    assert r.status == 200
    return json.loads(r.body)


async def test_connect_tunnels_only_where_a_route_allows_it() -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            config = {
                "upstreams": {"tcp": {"targets": [f"127.0.0.1:{port}"]}},
                "routes": [
                    {
                        "name": "tunnel",
                        "hosts": ["db.internal"],
                        "allow_connect": True,
                        "upstream": "tcp",
                    },
                    {"name": "web", "prefix": "/", "upstream": "tcp"},
                ],
            }
            async with open_gateway(config) as gw:
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(
                    b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\nping"
                )
                data = b""
                while not data.endswith(b"ping"):
                    data += await stream.receive_some(65536)
                assert data.startswith(b"HTTP/1.1 200 ")
                await stream.send_all(b" pong")
                assert await stream.receive_some(65536) == b" pong"
                await stream.send_eof()
                assert await stream.receive_some(65536) == b""  # the half-close came back
                await stream.aclose()
                refused = await raw_exchange(
                    gw.port, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"
                )
                assert refused.startswith(b"HTTP/1.1 400 ")
            nursery.cancel_scope.cancel()


async def test_a_passing_health_check_ends_an_outlier_ejection_early(
    stubs: Stubs, autojump_clock: Any
) -> None:
    outlier = {"consecutive_failures": 2, "base_ejection": "60s", "max_ejected_percent": 50}
    hc = {"path": "/healthz", "interval": "5s", "healthy_threshold": 1}
    config = _config(
        [stubs.target("flaky"), stubs.target("echo")], outlier=outlier, health_check=hc
    )
    with trio.fail_after(120):
        async with open_gateway(config) as gw:
            for _ in range(4):
                await http_request(gw.port, "GET", "/x?rate=1")
            snap = await _admin(gw.admin_port, "/upstreams")
            flaky = next(t for t in snap["up"]["targets"] if t["address"] == stubs.target("flaky"))
            assert not flaky["available"]  # ejected for 60 s
            await trio.sleep(6)  # one health-check interval, far less than the ejection
            snap = await _admin(gw.admin_port, "/upstreams")
            flaky = next(t for t in snap["up"]["targets"] if t["address"] == stubs.target("flaky"))
            assert flaky["available"]


# -- a pooled connection the server closed --------------------------------------------


def _drops_second_request() -> Any:
    """An upstream answering the first request of each connection; on the second it
    reads the request whole, then closes without a byte of an answer (it crashed, or
    its idle timeout fired as the request arrived: the gateway cannot tell which)."""

    async def handler(conn: UpstreamConn) -> None:
        for turn in range(2):
            got = await conn.read_request()
            if got is None or turn == 1:
                return
            rec, _body = got
            body = f"{rec.method.decode()} {conn.upstream.connections}".encode()
            await conn.send(response_head(200, content_length=len(body)) + body)

    return serve_upstream(handler)


async def _second_request(
    method: str, headers: list[tuple[str, str]] | None = None
) -> tuple[Any, Upstream]:
    """Prime the pool with one request, then send ``method`` without a body (a streamed
    body is never sent twice); its response, and the upstream."""
    async with _drops_second_request() as up, open_gateway(_config([up.target])) as gw:
        assert (await http_request(gw.port, "GET", "/prime")).status == 200
        resp = await http_request(gw.port, method, "/x", headers or [])
        return resp, up


async def test_idempotent_call_on_a_dropped_pooled_connection_goes_again() -> None:
    with trio.fail_after(10):
        resp, up = await _second_request("DELETE")
    assert resp.status == 200
    assert resp.body == b"DELETE 2"  # answered on a second, new connection
    assert [r.method for r in up.requests] == [b"GET", b"DELETE", b"DELETE"]


async def test_post_on_a_dropped_pooled_connection_is_not_sent_twice() -> None:
    # RFC 9110 9.2.2: the upstream may have acted on it before closing.
    with trio.fail_after(10):
        resp, up = await _second_request("POST")
    assert resp.status == 502
    assert resp.json()["error"]["code"] == "upstream_reset"
    assert [r.method for r in up.requests] == [b"GET", b"POST"]
    assert up.connections == 1


async def test_post_with_an_idempotency_key_is_not_sent_twice_either() -> None:
    # The gateway cannot know that the upstream honours the key.
    with trio.fail_after(10):
        resp, up = await _second_request("POST", [("Idempotency-Key", "order-7")])
    assert resp.status == 502
    assert [r.method for r in up.requests] == [b"GET", b"POST"]


async def test_any_token_is_a_method() -> None:
    with trio.fail_after(10):
        async with open_counting_upstream() as up, open_gateway(_config([up.target])) as gw:
            for method in ("M-SEARCH", "VERSION-CONTROL"):
                assert (await http_request(gw.port, method, "/x")).status == 200
    assert [r.method for r in up.requests] == [b"M-SEARCH", b"VERSION-CONTROL"]
    assert up.connections == 1


async def test_post_after_the_upstream_closed_an_idle_connection_is_sent_once() -> None:
    # The common stale case: the server closed the idle connection before the call. The
    # pool sees it closed before writing, so even a POST goes out once, on a new one.
    closed = trio.Event()

    async def handler(conn: UpstreamConn) -> None:
        got = await conn.read_request()
        if got is not None:
            await conn.send(response_head(200, content_length=2) + b"ok")
        await conn.stream.aclose()  # on loopback, the FIN is there when this returns
        closed.set()

    with trio.fail_after(10):
        async with serve_upstream(handler) as up, open_gateway(_config([up.target])) as gw:
            assert (await http_request(gw.port, "GET", "/prime")).status == 200
            await closed.wait()
            resp = await http_request(gw.port, "POST", "/x", body=b"pay 10")
    assert resp.status == 200
    assert [r.method for r in up.requests] == [b"GET", b"POST"]
    assert up.connections == 2


async def _open_tunnel(gw_port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", gw_port)
    await stream.send_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(1)
    assert head.startswith(b"HTTP/1.1 200 ")
    return stream


def _tunnel_config(port: int) -> dict[str, Any]:
    return {
        "upstreams": {"tcp": {"targets": [f"127.0.0.1:{port}"], "read_timeout": "1s"}},
        "routes": [
            {"name": "t", "hosts": ["db.internal"], "allow_connect": True, "upstream": "tcp"}
        ],
    }


async def test_a_tunnel_is_idle_only_when_both_directions_are(autojump_clock: Any) -> None:
    # The upstream talks for 2.7 s (read_timeout is 1 s) while the client says nothing:
    # the tunnel stays; once both sides have been silent for 1 s, it ends.
    async def ticker(stream: trio.SocketStream) -> None:
        async with stream:
            for i in range(10):
                await stream.send_all(b"tick %d\n" % i)
                await trio.sleep(0.3)
            await trio.sleep_forever()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, ticker, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            async with open_gateway(_tunnel_config(port)) as gw:
                stream = await _open_tunnel(gw.port)
                opened = trio.current_time()
                received = b""
                while chunk := await stream.receive_some(65536):
                    received += chunk
                ended = trio.current_time() - opened
                await stream.aclose()
            nursery.cancel_scope.cancel()
    assert received == b"".join(b"tick %d\n" % i for i in range(10))
    assert 3.5 <= ended <= 4.5  # the last tick at 2.7 s, then 1 s of silence both ways


async def test_a_tunnel_writes_its_access_log_line_when_it_ends(tmp_path: Path) -> None:
    """An open tunnel left no trace: now one line once it ends, with status 200, the
    target, and every byte the client was sent (the 200 head included)."""

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

    log = tmp_path / "access.log"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            config = _tunnel_config(port)
            config["access_log"] = {"path": str(log), "format": "json"}
            async with open_gateway(config) as gw:
                stream = await _open_tunnel(gw.port)
                await stream.send_all(b"x" * 1000)
                received = 0
                while received < 1000:
                    received += len(await stream.receive_some(65536))
                await stream.send_eof()
                assert await stream.receive_some(65536) == b""
                await stream.aclose()
                await trio.testing.wait_all_tasks_blocked()  # the tunnel's task has ended
            nursery.cancel_scope.cancel()  # (the gateway wrote its lines as it stopped)
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    assert line["method"] == "CONNECT"
    assert line["target"] == "db.internal:5432"
    assert line["status"] == 200
    assert line["route"] == "t"
    assert line["upstream"] == f"127.0.0.1:{port}"
    head = len(b"HTTP/1.1 200 Connection Established\r\n\r\n") + len(b"x-request-id: : \r\n")
    assert line["bytes_sent"] >= 1000 + head


async def test_a_tunnel_target_that_does_not_accept_is_504(autojump_clock: Any) -> None:
    """Timed out is not refused: 504 at connect_timeout, as for a proxied call."""
    with trio.fail_after(30):
        async with open_blackhole_upstream() as up:
            config = _tunnel_config(up.port)
            config["upstreams"]["tcp"]["connect_timeout"] = "2s"
            async with open_gateway(config) as gw:
                start = trio.current_time()
                data = await raw_exchange(
                    gw.port, b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n"
                )
                assert data.startswith(b"HTTP/1.1 504 ")
                assert trio.current_time() - start == pytest.approx(2.0, abs=0.1)


async def test_a_tunnel_passes_the_route_s_filters_first() -> None:
    """Authentication and limits apply to CONNECT as to any request on the route, global
    plugins included: a tunnel is no way around them. A refusal ends the connection,
    and its target never sees a connection."""
    connections = 0

    async def echo(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
            config = _tunnel_config(listeners[0].socket.getsockname()[1])
            config["plugins"] = {
                "key-auth": {
                    "header": "Proxy-Authorization",
                    "consumers": [{"id": "ops", "key_sha256": hash_key("ops-key")}],
                }
            }
            config["routes"][0]["plugins"] = {
                "rate-limit": {"limits": [{"limit": 1, "window": "1m"}], "key": "consumer"}
            }
            async with open_gateway(config) as gw:

                async def connect(*headers: bytes) -> bytes:
                    head = b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n"
                    return await raw_exchange(gw.port, head + b"".join(headers) + b"\r\n")

                refused = await connect()  # no key: 401, and the connection is closed
                assert refused.startswith(b"HTTP/1.1 401 ")
                assert b"\r\nconnection: close\r\n" in refused.lower()
                wrong = await connect(b"Proxy-Authorization: nope\r\n")
                assert wrong.startswith(b"HTTP/1.1 401 ")
                assert connections == 0

                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(
                    b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n"
                    b"Proxy-Authorization: ops-key\r\n\r\nping"
                )
                data = b""
                while not data.endswith(b"ping"):
                    data += await stream.receive_some(65536)
                assert data.startswith(b"HTTP/1.1 200 ")
                await stream.aclose()
                assert connections == 1

                limited = await connect(b"Proxy-Authorization: ops-key\r\n")  # 1 per minute
                assert limited.startswith(b"HTTP/1.1 429 ")
                assert b"\r\nratelimit-remaining: 0\r\n" in limited.lower()
                assert connections == 1
            nursery.cancel_scope.cancel()


def test_addresses_alternate_their_families() -> None:
    """RFC 8305 4: the resolver's first family first, then the other, in turn."""
    v6 = [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (f"2001:db8::{i}", 80, 0, 0)) for i in range(3)
    ]
    v4 = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"192.0.2.{i}", 80)) for i in range(2)]
    order = [info[4][0] for info in _interleave_families([*v6, *v4])]
    assert order == ["2001:db8::0", "192.0.2.0", "2001:db8::1", "192.0.2.1", "2001:db8::2"]
    assert _interleave_families(v4) == v4


async def test_the_target_health_gauge_follows_the_config_serving() -> None:
    """Every pool built, by a refused reload too, set its targets' gauge to 1 (a target
    down read as back), and a target a reload removed was exported for ever."""
    from engine.config import load
    from engine.metrics import render
    from engine.schema import ConfigError

    def config(*targets: str, bad: bool = False) -> dict[str, Any]:
        upstream: dict[str, Any] = {"targets": list(targets), "health_check": {"interval": "1h"}}
        doc: dict[str, Any] = {
            "upstreams": {"hg": upstream},
            "routes": [{"name": "r", "prefix": "/", "upstream": "hg"}],
        }
        if bad:
            upstream["timeout"] = "9s"  # a new pool for "hg" is built, then refused
            doc["plugins"] = {"retry": {"bogus": 1}}
        return doc

    def series() -> list[str]:
        return [
            line
            for line in render().decode().splitlines()
            if line.startswith('filtergate_upstream_target_healthy{upstream="hg"')
        ]

    a, b = "127.0.0.1:1", "127.0.0.1:2"
    with trio.fail_after(10):
        async with open_gateway(config(a, b)) as gw:
            pool = gw.gateway.runtime.pools["hg"]
            for _ in range(3):
                pool._record_probe(pool.targets[0], False)  # a fails its health checks
            down = f'filtergate_upstream_target_healthy{{upstream="hg",target="{a}"}} 0'
            assert down in series()
            with pytest.raises(ConfigError):
                await gw.gateway.reload(load(config(a, b, bad=True)))
            assert down in series()  # still down: the refused pool says nothing
            await gw.gateway.reload(load(config(b)))
            assert series() == [
                f'filtergate_upstream_target_healthy{{upstream="hg",target="{b}"}} 1'
            ]
