"""The admin listener: health, readiness, metrics, routes, upstreams, plugin states."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from engine.chain import Filter, Stage
from engine.exchange import Exchange
from engine.plugins import hookimpl
from engine.testing import Stubs, http_request, open_gateway
from tests.upstreams import open_truncating_upstream


async def test_admin_endpoints(stubs: Stubs) -> None:
    config = {
        "upstreams": {"echo": {"targets": [stubs.target("echo")]}},
        "routes": [
            {
                "name": "echo",
                "prefix": "/",
                "upstream": "echo",
                "plugins": {"circuit-breaker": {"consecutive_failures": 3}},
            }
        ],
    }
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            assert (await http_request(gw.port, "GET", "/x")).status == 200
            port = gw.admin_port
            assert port is not None
            assert (await http_request(port, "GET", "/healthz")).status == 200
            assert (await http_request(port, "GET", "/readyz")).status == 200
            metrics = (await http_request(port, "GET", "/metrics")).body.decode()
            assert 'filtergate_responses_total{code="2xx"}' in metrics
            assert "# TYPE filtergate_upstream_requests_total counter" in metrics
            routes = json.loads((await http_request(port, "GET", "/routes")).body)
            assert routes[0]["name"] == "echo"
            assert routes[0]["chain"] == ["circuit-breaker (limit)"]
            upstreams = json.loads((await http_request(port, "GET", "/upstreams")).body)
            assert upstreams["echo"]["targets"][0]["address"] == stubs.target("echo")
            plugins = json.loads((await http_request(port, "GET", "/plugins")).body)
            (breakers,) = plugins.values()
            assert any(b["state"] == "closed" for b in breakers.values())
            assert (await http_request(port, "GET", "/nope")).status == 404
            await gw.gateway.shutdown(grace=0)
            assert (await http_request(port, "GET", "/readyz")).status == 503


def _series(metrics: str, prefix: str) -> dict[str, float]:
    """The samples of ``metrics`` whose line starts with ``prefix``, by the rest of it."""
    out = {}
    for line in metrics.splitlines():
        if line.startswith(prefix):
            rest, _, value = line[len(prefix) :].rpartition(" ")
            out[rest] = float(value)
    return out


async def test_request_durations_by_route_and_status_class(
    stubs: Stubs, autojump_clock: object
) -> None:
    config = {
        "upstreams": {"slow": {"targets": [stubs.target("slow")]}},
        "routes": [{"name": "timed-route", "prefix": "/slow", "upstream": "slow"}],
    }
    with trio.fail_after(30):
        async with open_gateway(config) as gw:
            for _ in range(2):
                assert (await http_request(gw.port, "GET", "/slow?delay=0.3")).status == 200
            assert (await http_request(gw.port, "GET", "/nowhere")).status == 404
            assert gw.admin_port is not None
            metrics = (await http_request(gw.admin_port, "GET", "/metrics")).body.decode()
    assert "# TYPE filtergate_request_duration_seconds histogram" in metrics
    name = "filtergate_request_duration_seconds"
    ok = _series(metrics, f'{name}_bucket{{route="timed-route",code="2xx",')
    # 0.3 s of the stub's (virtual) time: above the 0.25 s bucket, within 0.5 s.
    assert ok['le="0.25"}'] == 0
    assert ok['le="0.5"}'] == ok['le="+Inf"}'] == 2
    assert _series(metrics, f'{name}_count{{route="timed-route",code="2xx"}}') == {"": 2}
    (total,) = _series(metrics, f'{name}_sum{{route="timed-route",code="2xx"}}').values()
    assert 0.6 <= total < 0.7
    assert _series(metrics, f'{name}_count{{route="",code="4xx"}}')[""] >= 1
    assert 'route="timed-route",code="4xx"' not in metrics  # no such response: no series


async def test_a_drain_that_runs_out_of_time_says_how_many_requests_it_cut(
    stubs: Stubs, autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    config = {
        "upstreams": {"slow": {"targets": [stubs.target("slow")]}},
        "routes": [{"name": "slow", "prefix": "/", "upstream": "slow"}],
    }
    with trio.fail_after(30):
        async with open_gateway(config) as gw, trio.open_nursery() as nursery:
            nursery.start_soon(http_request, gw.port, "GET", "/slow?delay=60")
            await trio.sleep(1)  # the request is in flight
            await gw.gateway.shutdown(grace=5)
            nursery.cancel_scope.cancel()
    cut = [r.getMessage() for r in caplog.records if "cut off" in r.getMessage()]
    assert cut == ["shutdown: 1 request(s) still in flight after 5s are cut off"]


async def test_a_response_a_drain_cuts_off_is_still_logged(
    autojump_clock: object, tmp_path: Path
) -> None:
    """It left no access-log line, nor a duration, where any other cut-off has both."""
    log = tmp_path / "access.log"
    with trio.fail_after(30):
        async with open_truncating_upstream(declared=1000, sent=10, stall=True) as up:
            config = {
                "access_log": {"path": str(log)},
                "upstreams": {"u": {"targets": [up.target], "read_timeout": "60s"}},
                "routes": [{"name": "stalled", "prefix": "/", "upstream": "u"}],
            }
            async with open_gateway(config) as gw, trio.open_nursery() as nursery:
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
                got = b""
                while not got.endswith(b"x" * 10):
                    got += await stream.receive_some(65536)
                await gw.gateway.shutdown(grace=2)
                nursery.cancel_scope.cancel()
                await stream.aclose()
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    assert line["status"] == 200
    assert line["route"] == "stalled"
    assert line["bytes_sent"] == len(got)


async def test_drain_delay_says_not_ready_while_still_serving(
    stubs: Stubs, autojump_clock: object
) -> None:
    config = {
        "server": {"drain_delay": "10s"},
        "upstreams": {"echo": {"targets": [stubs.target("echo")]}},
        "routes": [{"name": "echo", "prefix": "/", "upstream": "echo"}],
    }
    with trio.fail_after(60):
        async with open_gateway(config) as gw, trio.open_nursery() as nursery:
            assert gw.admin_port is not None
            done = trio.Event()

            async def shut_down() -> None:
                await gw.gateway.shutdown(grace=1)
                done.set()

            nursery.start_soon(shut_down)
            await trio.sleep(5)
            # Not ready for the load balancer, yet new connections are still served.
            assert (await http_request(gw.admin_port, "GET", "/readyz")).status == 503
            assert (await http_request(gw.port, "GET", "/x")).status == 200
            assert not done.is_set()
            await trio.sleep(6)  # the delay is over: the listeners are closed
            assert done.is_set()
            with pytest.raises(OSError, match="all attempts to connect"):
                await http_request(gw.port, "GET", "/x")


class _BrokenState(Filter):
    """A filter whose admin snapshot() raises: a plugin's bug."""

    name = "broken-state"
    stage = Stage.EDGE

    def on_request(self, exchange: Exchange) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        raise RuntimeError("a plugin's bug")


class _BrokenStatePlugin:
    @hookimpl
    def filtergate_filters(self) -> list[type[Any]]:
        return [_BrokenState]


async def test_a_plugin_bug_behind_an_admin_page_is_a_500_not_the_gateway_s_end(
    stubs: Stubs,
) -> None:
    config = {
        "upstreams": {"echo": {"targets": [stubs.target("echo")]}},
        "routes": [
            {"name": "echo", "prefix": "/", "upstream": "echo", "plugins": {"broken-state": {}}}
        ],
    }
    with trio.fail_after(20):
        async with open_gateway(
            config, extra_plugins=[("broken-state", _BrokenStatePlugin())]
        ) as gw:
            port = gw.admin_port
            assert port is not None
            assert (await http_request(port, "GET", "/plugins")).status == 500
            assert (await http_request(port, "GET", "/metrics")).status == 200
            assert (await http_request(gw.port, "GET", "/x")).status == 200  # still serving


async def test_hostile_admin_requests_get_an_answer() -> None:
    """A head too large gets a 431, a malformed one a 400; a request with a body (none
    is needed) is read past and answered, not reset."""
    from engine.testing import raw_exchange

    config = {"upstreams": {"up": {"targets": ["127.0.0.1:1"]}}, "routes": []}
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            port = gw.admin_port
            assert port is not None
            huge = await raw_exchange(port, b"GET /" + b"a" * 40_000 + b" HTTP/1.1\r\n")
            bad = await raw_exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\nno colon\r\n\r\n")
            with_body = await http_request(port, "DELETE", "/cache", body=b"x" * 1_000_000)
    assert huge.startswith(b"HTTP/1.1 431 ")
    assert bad.startswith(b"HTTP/1.1 400 ")
    assert with_body.status == 200
    assert with_body.json()["purged"] == 0
