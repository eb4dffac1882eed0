"""The engine's own config: a value that cannot work is an error naming its key path."""

from __future__ import annotations

from typing import Any

import pytest

from engine.config import load
from engine.gateway import compile_runtime
from engine.plugins import discover
from engine.schema import ConfigError


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"server": {"accept_batch": 0}}, "server.accept_batch"),  # would never accept
        ({"server": {"max_connections": -1}}, "server.max_connections"),
        ({"server": {"workers": 0}}, "server.workers"),
        ({"server": {"max_head_size": 100}}, "server.max_head_size"),
        ({"server": {"underscores_in_headers": "keep"}}, "server.underscores_in_headers"),
        ({"source": "elsewhere.toml"}, "source"),  # set by the loader, not a key of the file
        # A header line injected into every response, or a second Content-Length on it.
        ({"server": {"request_id_header": "x-id\r\nset-cookie: a=1"}}, "server.request_id_header"),
        ({"server": {"request_id_header": "Content-Length"}}, "server.request_id_header"),
        ({"server": {"request_id_header": "host"}}, "server.request_id_header"),
        ({"server": {"request_id_header": ""}}, "server.request_id_header"),
        ({"server": {"request_id_header": "Content-Encoding"}}, "server.request_id_header"),
        ({"server": {"request_id_header": "server"}}, "server.request_id_header"),
        # 0 would time out at once (a 504 for every call, every target ejected)
        ({"server": {"head_timeout": 0}}, "server.head_timeout"),
        ({"server": {"write_timeout": "0s"}}, "server.write_timeout"),
        (
            {"upstreams": {"u": {"targets": ["127.0.0.1:9"], "connect_timeout": 0}}},
            "upstreams.u.connect_timeout",
        ),
        (
            {"upstreams": {"u": {"targets": ["127.0.0.1:9"], "read_timeout": 0}}},
            "upstreams.u.read_timeout",
        ),
    ],
)
def test_values_that_cannot_work_name_their_key(data: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(data)
    assert info.value.path == where


def test_a_global_plugin_table_no_route_uses_is_still_checked() -> None:
    bad = {"rate-limit": {"limits": [{"limit": 1, "window": "soon"}]}}
    no_routes = load({"plugins": bad})
    switched_off = load(
        {
            "plugins": bad,
            "upstreams": {"u": {"targets": ["127.0.0.1:9"]}},
            "routes": [
                {"prefix": "/", "upstream": "u", "plugins": {"rate-limit": {"enabled": False}}}
            ],
        }
    )
    registry = discover(entry_points=False)
    for config in (no_routes, switched_off):
        with pytest.raises(ConfigError) as info:
            compile_runtime(config, registry)
        assert info.value.path == "plugins.rate-limit.limits[0].window"
    # Defaults only (enabled = false) may be partial: routes complete them.
    defaults = {"rate-limit": {"enabled": False, "store": "memory"}}
    compile_runtime(load({"plugins": defaults}), registry)


@pytest.mark.parametrize(
    ("plugins", "route_plugins", "where"),
    [
        ({"rate-limit": {"enabled": False, "limts": []}}, {}, "plugins.rate-limit.limts"),
        ({"rate-limit": {"enabled": False, "limits": "5/s"}}, {}, "plugins.rate-limit.limits"),
        (
            {},
            {"jwt-auth": {"enabled": False, "issuers": 5}},
            "routes[0].plugins.jwt-auth.issuers",
        ),
        (
            {"retry": {}},
            {"retry": {"enabled": False, "atempts": 3}},
            "routes[0].plugins.retry.atempts",
        ),
    ],
)
def test_a_switched_off_plugin_table_is_checked_for_what_it_has(
    plugins: dict[str, Any], route_plugins: dict[str, Any], where: str
) -> None:
    """A typo in a table with enabled = false passed check, to fail the day a route
    turned the plugin on."""
    config = load(
        {
            "plugins": plugins,
            "upstreams": {"u": {"targets": ["127.0.0.1:9"]}},
            "routes": [{"prefix": "/", "upstream": "u", "plugins": route_plugins}],
        }
    )
    with pytest.raises(ConfigError) as info:
        compile_runtime(config, discover(entry_points=False))
    assert info.value.path == where


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_duration_must_be_a_finite_number(value: float) -> None:
    """TOML has nan and inf: check passed them, and run broke (int(nan)) or never
    timed out."""
    with pytest.raises(ConfigError, match="expected a non-negative duration") as info:
        load({"server": {"head_timeout": value}})
    assert info.value.path == "server.head_timeout"


@pytest.mark.parametrize(
    ("route", "where", "message"),
    [
        ({"prefix": "/café"}, "routes[0].prefix", "write '/caf%C3%A9'"),
        ({"prefix": "/%7Euser"}, "routes[0].prefix", "write '/~user'"),
        ({"path": "/caf%c3%a9/menu"}, "routes[0].path", "write '/caf%C3%A9/menu'"),
        ({"prefix": "/a//b"}, "routes[0].prefix", "write '/a/b'"),
        ({"prefix": "/a/../b"}, "routes[0].prefix", "write '/b'"),
        ({"prefix": "/a?x=1"}, "routes[0].prefix", "a path has no query"),
        ({"prefix": "/a%2Fb"}, "routes[0].prefix", "encoded /"),
        ({"hosts": ["portal.example.com:8080"]}, "routes[0].hosts[0]", "a port never matches"),
        ({"headers": {"Host": "a"}}, "routes[0].headers.Host", 'matched by "hosts"'),
        ({"headers": {"x-forwarded-for": "1.2.3.4"}}, "routes[0].headers.x-forwarded-for", ""),
        ({"headers": {"x-request-id": "a"}}, "routes[0].headers.x-request-id", "request id"),
        ({"headers": {"x_tenant": "a"}}, "routes[0].headers.x_tenant", "underscores_in_headers"),
    ],
)
def test_a_route_condition_no_request_can_meet_is_an_error(
    route: dict[str, Any], where: str, message: str
) -> None:
    """check passed them, and the route never matched: a guarded route left silently
    dead, its requests taken by a catch-all."""
    data = {
        "upstreams": {"u": {"targets": ["127.0.0.1:9"]}},
        "routes": [{"upstream": "u", **route}],
    }
    with pytest.raises(ConfigError, match="never matches") as info:
        load(data)
    assert info.value.path == where
    assert message in info.value.message


def test_canonical_patterns_and_allowed_underscores_pass() -> None:
    routes = [
        {"path": "/users/{id}", "upstream": "u"},
        {"prefix": "/caf%C3%A9/", "upstream": "u"},
        {"prefix": "/~user", "upstream": "u", "headers": {"x_tenant": "a"}},
    ]
    data = {
        "server": {"underscores_in_headers": "allow"},
        "upstreams": {"u": {"targets": ["127.0.0.1:9"]}},
        "routes": routes,
    }
    assert len(load(data).routes) == 3


def test_a_key_missing_from_a_route_s_own_plugin_table_is_named_there() -> None:
    """It was blamed on plugins.rate-limit.limits, a table the file does not have."""
    config = load(
        {
            "upstreams": {"u": {"targets": ["127.0.0.1:9"]}},
            "routes": [
                {"prefix": "/", "upstream": "u", "plugins": {"rate-limit": {"store": "memory"}}}
            ],
        }
    )
    with pytest.raises(ConfigError, match="required key is missing") as info:
        compile_runtime(config, discover(entry_points=False))
    assert info.value.path == "routes[0].plugins.rate-limit.limits"


def _notes(routes: list[dict[str, Any]]) -> dict[str, list[str]]:
    from engine.gateway import route_notes

    config = load({"upstreams": {"u": {"targets": ["127.0.0.1:9"]}}, "routes": routes})
    return route_notes(compile_runtime(config, discover(entry_points=False)))


def test_a_route_an_earlier_one_takes_every_request_of_is_noted() -> None:
    """check passed two routes of one pattern silently; the second never matched."""
    notes = _notes(
        [
            {"name": "a", "path": "/users/{id}", "upstream": "u"},
            {"name": "b", "path": "/users/{uid}", "upstream": "u"},  # same shape
            {"name": "c", "prefix": "/x", "methods": ["GET", "POST"], "upstream": "u"},
            {"name": "d", "prefix": "/x/", "methods": ["HEAD"], "upstream": "u"},  # GET has it
            {"name": "e", "prefix": "/x", "methods": ["PUT"], "upstream": "u"},  # its own
            {"name": "f", "prefix": "/x", "upstream": "u"},  # any other method
            {"name": "g", "prefix": "/x", "headers": {"x-v": "2"}, "upstream": "u"},  # more
            {"name": "h", "prefix": "/x", "hosts": ["a.example"], "upstream": "u"},
        ]
    )
    assert set(notes) == {"b", "d"}
    assert "route 'a' before it" in notes["b"][0]
    assert "route 'c' before it" in notes["d"][0]


def test_rate_limit_groups_with_no_authentication_before_them_are_noted() -> None:
    limits = {"limits": [{"limit": 10, "window": "1s"}]}
    groups = {**limits, "groups": {"gold": limits}}
    notes = _notes(
        [
            {"name": "open", "prefix": "/a", "upstream": "u", "plugins": {"rate-limit": groups}},
            {"name": "plain", "prefix": "/b", "upstream": "u", "plugins": {"rate-limit": limits}},
        ]
    )
    assert list(notes) == ["open"]
    assert "groups never apply" in notes["open"][0]


def test_plugin_defaults_are_described_as_gateway_toml_writes_them() -> None:
    """filtergate plugins printed Python reprs: False, None, ('5xx',), 8192, and a whole
    RedisConfig(...) on one line."""
    from engine.schema import describe_fields
    from plugins.rate_limit import RateLimitConfig

    rows = {key: default for key, _typ, default, _doc in describe_fields(RateLimitConfig)}
    assert rows["key"] == '["consumer"]'
    assert rows["headers"] == "true"
    assert rows["redis"] == "(below)"
    assert rows["redis.timeout"] == '"100ms"'
    assert rows["redis.password"] == "(none)"
    assert rows["redis.url"] == '"redis://127.0.0.1:6379/0"'


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1s", "expected a non-negative duration, got '-1s'"),
        ("5sec", "(seconds, or a number with ms, s, m, h or d), got '5sec'"),
    ],
)
def test_a_bad_duration_says_what_is_wrong(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({"server": {"head_timeout": value}})
    assert message in info.value.message


def test_an_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(ConfigError) as info:
        load({"server": {"head_timout": "5s"}})
    assert info.value.path == "server.head_timout"
    assert info.value.message.startswith("unknown key (did you mean 'head_timeout'? known keys:")


def test_a_request_remove_without_mandatory_is_noted() -> None:
    """A client made such removes skip (a body over the cap, compressed, or not JSON
    passes on unedited): check says so, and what to set."""
    plugins = {"transform": {"request": {"json": {"remove": ["admin"]}}}}
    strict = {"transform": {"request": {"json": {"remove": ["admin"], "mandatory": True}}}}
    notes = _notes(
        [
            {"name": "lenient", "prefix": "/a", "upstream": "u", "plugins": plugins},
            {"name": "strict", "prefix": "/b", "upstream": "u", "plugins": strict},
        ]
    )
    assert list(notes) == ["lenient"]
    assert "mandatory = true" in notes["lenient"][0]


def test_ten_thousand_routes_load_and_are_noted_in_one_pass() -> None:
    """The shadowed-route warning compared every route with every earlier one: 10,000
    routes took minutes at start-up (the 10,000-routes benchmark never started). Under
    the suite's per-test timeout, the quadratic version cannot pass."""
    from engine.gateway import route_notes

    routes = [{"name": f"r{i}", "prefix": f"/p{i}", "upstream": "u"} for i in range(10_000)]
    routes.append({"name": "again", "prefix": "/p9999", "upstream": "u"})
    config = load({"upstreams": {"u": {"targets": ["127.0.0.1:9"]}}, "routes": routes})
    notes = route_notes(compile_runtime(config, discover(entry_points=False)))
    assert list(notes) == ["again"]
