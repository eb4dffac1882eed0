"""header-stamp, tested with filtergate's test kit (engine.testing) as a plugin author would.

Run from this directory: ``python -m pytest`` (pyproject sets trio_mode and src/ on the path).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from filtergate_header_stamp import HeaderStamp, filtergate_filters

from engine.errors import Unauthorized
from engine.exchange import Exchange, Response
from engine.schema import ConfigError
from engine.testing import (
    build_filter,
    http_request,
    make_exchange,
    open_gateway,
    open_stubs,
    run_chain,
)


@pytest.mark.parametrize(
    ("table", "request_stamp", "response_stamp"),
    [
        ({"value": "v1"}, "v1", "v1"),
        ({"value": "{route}/{request_id}"}, "orders/test-1", "orders/test-1"),
        ({"value": "v1", "request_header": ""}, None, "v1"),
        ({"value": "v1", "response_header": ""}, "v1", None),
    ],
)
async def test_stamps(
    table: dict[str, Any], request_stamp: str | None, response_stamp: str | None
) -> None:
    with trio.fail_after(5):
        stamp = build_filter(HeaderStamp, table)
        exchange = make_exchange("GET", "/orders/1", route_name="orders")
        response = await run_chain([stamp], exchange)
        got = exchange.request.headers.get("x-stamp")
        assert (got.decode() if got else None) == request_stamp
        got = response.headers.get("x-stamp")
        assert (got.decode() if got else None) == response_stamp


async def test_stamps_the_response_an_earlier_filter_refused() -> None:
    class Deny:
        name = "deny"
        stage = HeaderStamp.stage  # same stage, configured first: runs first

        def on_request(self, exchange: Exchange) -> None:
            raise Unauthorized("no")

    with trio.fail_after(5):
        stamp = build_filter(HeaderStamp, {"value": "v1"})
        response = await run_chain([Deny(), stamp], make_exchange())
        assert response.status == 401
        # header-stamp never saw the request, so its response phase does not run.
        assert response.headers.get("x-stamp") is None

        response = await run_chain([stamp, Deny()], make_exchange())
        assert response.status == 401
        assert response.headers.get("x-stamp") == b"v1"


async def test_counts_responses_on_the_instance() -> None:
    with trio.fail_after(5):
        stamp = build_filter(HeaderStamp, {"value": "v", "count_header": "x-stamp-count"})
        for n in (1, 2, 3):
            response = await run_chain([stamp], make_exchange(), Response(204))
            assert response.headers.get("x-stamp-count") == str(n).encode()


@pytest.mark.parametrize(
    ("table", "path"),
    [
        ({}, "plugins.header-stamp.value"),
        ({"value": 3}, "plugins.header-stamp.value"),
        ({"value": "a\r\nb"}, "plugins.header-stamp.value"),
        ({"value": "v", "colour": "red"}, "plugins.header-stamp.colour"),
        ({"value": "v", "request_header": "X Stamp"}, "plugins.header-stamp.request_header"),
        ({"value": "v", "request_header": "", "response_header": ""}, "plugins.header-stamp"),
    ],
)
def test_config_errors_name_the_key(table: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_filter(HeaderStamp, table)
    assert info.value.path == path


def test_hook_provides_the_filter_type() -> None:
    assert list(filtergate_filters()) == [HeaderStamp]


async def test_in_a_running_gateway() -> None:
    import filtergate_header_stamp

    with trio.fail_after(10):
        async with open_stubs(names=["echo"]) as stubs:
            config = {
                "upstreams": {"echo": {"targets": [stubs.target("echo")]}},
                "routes": [{"name": "echo", "prefix": "/", "upstream": "echo"}],
                "plugins": {"header-stamp": {"value": "gw {route}"}},
            }
            async with open_gateway(
                config, extra_plugins=[("header-stamp", filtergate_header_stamp)]
            ) as gw:
                resp = await http_request(gw.port, "GET", "/hello")
                assert resp.status == 200
                assert resp.header("x-stamp") == "gw echo"
                assert resp.json()["headers"]["x-stamp"] == "gw echo"
