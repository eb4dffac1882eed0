"""The admin listener: health, readiness, metrics, routes, upstreams, plugin states."""

from __future__ import annotations

import json

import trio

from engine.testing import Stubs, http_request, open_gateway


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
