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
