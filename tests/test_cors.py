"""The ``cors`` filter, through a running gateway in front of a real upstream.

The upstream counts what reaches it, so each test can tell a preflight the gateway
answered from one it passed on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from engine.config import load
from engine.gateway import compile_runtime
from engine.plugins import discover
from engine.schema import ConfigError
from engine.testing import HttpResponse, http_request, open_gateway
from plugins.key_auth import hash_key
from tests.upstreams import Upstream, UpstreamConn, response_head, serve_upstream

APP = "https://app.example.com"
KEY = "cors-test-key-0123456789abcdef0123"


@asynccontextmanager
async def upstream(headers: Sequence[tuple[str, str]] = ()) -> AsyncIterator[Upstream]:
    """An upstream answering every request with ``ok`` and ``headers``."""

    async def handler(conn: UpstreamConn) -> None:
        while (got := await conn.read_request()) is not None:
            await conn.send(response_head(200, list(headers), content_length=2) + b"ok")
            del got

    async with serve_upstream(handler) as up:
        yield up


def _config(target: str, cors: dict[str, Any], **route: Any) -> dict[str, Any]:
    plugins = {"cors": cors, **route.pop("plugins", {})}
    return {
        "upstreams": {"up": {"targets": [target]}},
        "routes": [
            {"name": "api", "prefix": "/api/", "upstream": "up", "plugins": plugins, **route},
            {"name": "plain", "prefix": "/plain/", "upstream": "up", "methods": ["GET"]},
        ],
    }


def _preflight(
    origin: str = APP, method: str = "DELETE", headers: str | None = None
) -> list[tuple[str, str]]:
    fields = [("origin", origin), ("access-control-request-method", method)]
    if headers is not None:
        fields.append(("access-control-request-headers", headers))
    return fields


async def _ask(
    cors: dict[str, Any],
    requests: Sequence[tuple[str, str, Sequence[tuple[str, str]]]],
    upstream_headers: Sequence[tuple[str, str]] = (),
    **route: Any,
) -> tuple[list[HttpResponse], Upstream]:
    """Send ``requests`` (method, path, fields) to a gateway whose route ``api`` has
    ``cors``; their answers, and the upstream."""
    with trio.fail_after(20):
        async with upstream(upstream_headers) as up:
            async with open_gateway(_config(up.target, cors, **route)) as gw:
                answers = [
                    await http_request(gw.port, method, path, list(fields))
                    for method, path, fields in requests
                ]
    return answers, up


async def test_a_preflight_is_answered_at_the_edge_for_an_allowed_origin() -> None:
    cors = {"origins": [APP], "max_age": "10m", "exposed_headers": ["X-Total"]}
    (pre, other, plain), up = await _ask(
        cors,
        [
            ("OPTIONS", "/api/things", _preflight(headers="content-type, x-trace")),
            ("OPTIONS", "/api/things", _preflight(origin="https://evil.example")),
            ("OPTIONS", "/plain/things", _preflight(method="GET")),  # a route without cors
        ],
        methods=["GET", "DELETE"],
    )
    assert pre.status == 204
    assert pre.header("access-control-allow-origin") == APP
    assert pre.header("access-control-allow-methods") == "DELETE, GET, HEAD"  # the route's
    assert pre.header("access-control-allow-headers") == "content-type, x-trace"  # as asked
    assert pre.header("access-control-max-age") == "600"
    assert pre.header("access-control-allow-credentials") is None
    assert pre.header("vary") == (
        "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    )
    assert pre.body == b""
    assert other.status == 204  # answered, with nothing that lets the browser go on
    assert other.header("access-control-allow-origin") is None
    assert other.header("access-control-allow-methods") is None
    assert plain.status == 405  # no cors on that route: an OPTIONS it does not take
    assert up.requests == []


async def test_a_preflight_reaches_a_route_by_the_method_it_announces() -> None:
    # A route that takes only GET gets the preflights of its GETs, not a 405; one that
    # announces a method the route does not take is routed as the OPTIONS it is.
    (get, put), up = await _ask(
        {"origins": [APP]},
        [
            ("OPTIONS", "/api/x", _preflight(method="GET")),
            ("OPTIONS", "/api/x", _preflight(method="PUT")),
        ],
        methods=["GET"],
    )
    assert get.status == 204
    assert get.header("access-control-allow-methods") == "GET, HEAD"
    assert put.status == 405
    assert up.requests == []


async def test_answers_to_an_allowed_origin_say_so_and_the_upstreams_own_fields_go() -> None:
    cors = {"origins": [APP], "credentials": True, "exposed_headers": ["X-Total"]}
    (allowed, refused, none), up = await _ask(
        cors,
        [
            ("GET", "/api/things", [("origin", APP)]),
            ("GET", "/api/things", [("origin", "https://evil.example")]),
            ("GET", "/api/things", []),
        ],
        upstream_headers=[("access-control-allow-origin", "*"), ("vary", "accept-encoding")],
    )
    assert allowed.status == 200
    assert allowed.header_all("access-control-allow-origin") == [APP]
    assert allowed.header("access-control-allow-credentials") == "true"
    assert allowed.header("access-control-expose-headers") == "x-total"
    assert allowed.header_all("vary") == ["accept-encoding", "Origin"]
    for other in (refused, none):  # served, without the fields (the browser refuses)
        assert other.status == 200
        assert other.header("access-control-allow-origin") is None
        assert "Origin" in other.header_all("vary")
    assert len(up.requests) == 3


async def test_any_origin_is_answered_with_a_star_and_no_vary() -> None:
    (answer, pre), _ = await _ask(
        {"origins": ["*"], "methods": ["GET", "POST"], "headers": ["Content-Type"]},
        [
            ("GET", "/api/things", [("origin", "https://anyone.example")]),
            ("OPTIONS", "/api/things", _preflight(method="POST", headers="x-anything")),
        ],
    )
    assert answer.header("access-control-allow-origin") == "*"
    assert answer.header("vary") is None
    assert pre.header("access-control-allow-origin") == "*"
    assert pre.header("access-control-allow-methods") == "GET, POST"
    assert pre.header("access-control-allow-headers") == "content-type"  # as configured


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://a.example.com", True),
        ("https://a.b.example.com", True),
        ("https://A.Example.com", True),
        ("https://example.com", False),
        ("https://evilexample.com", False),
        ("http://a.example.com", False),
        ("https://a.example.com.evil.io", False),
        ("https://a.example.com:8443", False),
        ("null", False),
    ],
)
async def test_a_subdomain_pattern_allows_its_subdomains_only(origin: str, allowed: bool) -> None:
    (answer,), _ = await _ask(
        {"origins": ["https://*.example.com", "https://partner.io:8443"]},
        [("GET", "/api/x", [("origin", origin)])],
    )
    assert answer.header("access-control-allow-origin") == (origin if allowed else None)


async def test_a_refusal_of_a_later_filter_carries_the_fields_and_preflights_pass_it() -> None:
    auth = {"key-auth": {"consumers": [{"id": "web", "key_sha256": hash_key(KEY)}]}}
    (refused, pre, served), up = await _ask(
        {"origins": [APP]},
        [
            ("GET", "/api/things", [("origin", APP)]),  # no key: 401
            ("OPTIONS", "/api/things", _preflight(method="GET", headers="x-api-key")),
            ("GET", "/api/things", [("origin", APP), ("x-api-key", KEY)]),
        ],
        plugins=auth,
    )
    assert refused.status == 401
    assert refused.header("access-control-allow-origin") == APP  # the page can read why
    assert pre.status == 204  # no credential on a preflight, and none asked
    assert served.status == 200
    assert served.header("access-control-allow-origin") == APP
    assert len(up.requests) == 1


async def test_a_private_network_preflight_is_allowed_when_told() -> None:
    asked = [*_preflight(method="GET"), ("access-control-request-private-network", "true")]
    (told,), _ = await _ask(
        {"origins": [APP], "private_network": True}, [("OPTIONS", "/api/x", asked)]
    )
    (not_told,), _ = await _ask({"origins": [APP]}, [("OPTIONS", "/api/x", asked)])
    assert told.header("access-control-allow-private-network") == "true"
    assert not_told.header("access-control-allow-private-network") is None


async def test_an_options_that_is_no_preflight_goes_upstream() -> None:
    (answer,), up = await _ask(
        {"origins": [APP]}, [("OPTIONS", "/api/x", [("origin", APP)])]
    )  # no Access-Control-Request-Method: the upstream's own OPTIONS
    assert answer.status == 200
    assert answer.header("access-control-allow-origin") == APP
    assert [r.method for r in up.requests] == [b"OPTIONS"]


async def test_cached_answers_get_each_origin_its_own_fields() -> None:
    (first, second, third), up = await _ask(
        {"origins": [APP, "https://admin.example.com"]},
        [
            ("GET", "/api/things", [("origin", APP)]),
            ("GET", "/api/things", [("origin", "https://admin.example.com")]),
            ("GET", "/api/things", [("origin", "https://evil.example")]),
        ],
        upstream_headers=[("cache-control", "max-age=60")],
        plugins={"cache": {}},
    )
    assert first.header("x-cache-status") == "MISS"
    assert second.header("x-cache-status") == third.header("x-cache-status") == "HIT"
    assert first.header("access-control-allow-origin") == APP
    assert second.header("access-control-allow-origin") == "https://admin.example.com"
    assert third.header("access-control-allow-origin") is None
    assert len(up.requests) == 1


async def test_a_route_left_out_of_cors_gets_no_approval_from_a_broader_one() -> None:
    config = {
        "upstreams": {"up": {"targets": ["127.0.0.1:1"]}},
        "routes": [
            {
                "name": "account",
                "prefix": "/account/",
                "upstream": "up",
                "plugins": {"cors": {"origins": [APP], "credentials": True}},
            },
            {"name": "close", "path": "/account/close", "methods": ["POST"], "upstream": "up"},
        ],
    }
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            close = await http_request(
                gw.port, "OPTIONS", "/account/close", _preflight(method="POST")
            )
            other = await http_request(gw.port, "OPTIONS", "/account/x", _preflight(method="POST"))
    assert close.status == 405  # the POST route's OPTIONS: it takes none
    assert close.header("access-control-allow-origin") is None
    assert other.status == 204
    assert other.header("access-control-allow-origin") == APP


async def test_a_route_of_its_own_for_options_still_gets_its_preflights() -> None:
    # cors on another route must not change how /items's preflights are routed: to
    # the route that takes OPTIONS there, whose upstream answers them itself.
    with trio.fail_after(20):
        async with upstream() as up:
            config = {
                "upstreams": {"up": {"targets": [up.target]}},
                "routes": [
                    {"name": "items", "path": "/items", "methods": ["GET"], "upstream": "up"},
                    {"name": "opts", "path": "/items", "methods": ["OPTIONS"], "upstream": "up"},
                    {
                        "name": "other",
                        "path": "/other",
                        "upstream": "up",
                        "plugins": {"cors": {"origins": [APP]}},
                    },
                ],
            }
            async with open_gateway(config) as gw:
                pre = await http_request(gw.port, "OPTIONS", "/items", _preflight(method="GET"))
    assert pre.status == 200
    assert [r.method for r in up.requests] == [b"OPTIONS"]


async def test_a_route_kept_across_reloads_is_answered_with_its_own_methods() -> None:
    # The filter instance outlives reloads that keep its config; the routes do not.
    with trio.fail_after(30):
        async with upstream() as up:
            config = _config(up.target, {"origins": [APP]}, methods=["GET"])
            async with open_gateway(config) as gw:
                allowed = []
                for i in range(20):
                    methods = ["GET"] if i % 2 else ["PUT"]
                    changed = _config(up.target, {"origins": [APP]}, methods=methods)
                    changed["server"] = {"listen": ["127.0.0.1:0"]}
                    changed["admin"] = {"listen": "127.0.0.1:0"}
                    await gw.gateway.reload(load(changed))
                    pre = await http_request(
                        gw.port, "OPTIONS", "/api/x", _preflight(method=methods[0])
                    )
                    allowed.append(pre.header("access-control-allow-methods"))
    assert allowed == ["PUT", "GET, HEAD"] * 10


async def test_any_origin_answers_requests_without_an_origin_alike() -> None:
    # A cache (a CDN's, a browser's) that keeps the answer to a request with no Origin
    # (an <img>, a CDN fill) must hand the same to fetch(): no Vary is said.
    (none, some), _ = await _ask(
        {"origins": ["*"]},
        [("GET", "/api/x", []), ("GET", "/api/x", [("origin", "https://a.example")])],
        upstream_headers=[("cache-control", "public, max-age=600")],
    )
    assert none.header("access-control-allow-origin") == some.header("access-control-allow-origin")
    assert none.header("access-control-allow-origin") == "*"
    assert none.header("vary") is None


@pytest.mark.parametrize(
    ("table", "path", "says"),
    [
        ({}, "origins", "missing"),
        ({"origins": []}, "origins", "list the origins"),
        ({"origins": ["https://app.example.com/"]}, "origins[0]", "no path"),
        ({"origins": ["app.example.com"]}, "origins[0]", "not an origin"),
        ({"origins": ["https://App.example.com"]}, "origins[0]", "lower case"),
        ({"origins": ["https://a.*.example.com"]}, "origins[0]", "not an origin"),
        ({"origins": ["*"], "credentials": True}, "origins", "list the origins"),
        ({"origins": ["https://a.example.com:443"]}, "origins[0]", "never matches"),
        ({"origins": ["http://a.example.com:80"]}, "origins[0]", "never matches"),
        ({"origins": ["https://a.example.com:99999"]}, "origins[0]", "no such port"),
        ({"origins": ["https://a.example.com:0"]}, "origins[0]", "no such port"),
        ({"origins": ["https://*.com"]}, "origins[0]", "top-level domain"),
        ({"origins": ["https://-.example.com"]}, "origins[0]", "not an origin"),
        ({"origins": [APP], "credentials": True, "headers": ["*"]}, "headers[0]", '"*"'),
        (
            {"origins": [APP], "credentials": True, "exposed_headers": ["*"]},
            "exposed_headers[0]",
            '"*"',
        ),
        ({"origins": ["*"], "max_age": "0.5s"}, "max_age", "whole seconds"),
        ({"origins": ["*"], "methods": ["get"]}, "methods[0]", "upper case"),
        ({"origins": ["*"], "headers": ["bad name"]}, "headers[0]", "not a header name"),
        ({"origins": ["*"], "max_age": "-1s"}, "max_age", "non-negative"),
    ],
)
def test_bad_config_names_the_key(table: dict[str, Any], path: str, says: str) -> None:
    config = load(_config("127.0.0.1:1", table))
    with pytest.raises(ConfigError) as err:
        compile_runtime(config, discover(entry_points=False))
    assert err.value.path == f"routes[0].plugins.cors.{path}"
    assert says in str(err.value)
