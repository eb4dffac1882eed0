"""Route matching: specificity rules, captures, 404/405, and that it does not scan."""

from __future__ import annotations

from typing import Any

import pytest

from engine.config import load
from engine.errors import MethodNotAllowed, NotFound
from engine.router import Router


def _router(routes: list[dict[str, Any]]) -> Router[str]:
    config = load({"upstreams": {"u": {"targets": ["127.0.0.1:1"]}}, "routes": routes})
    return Router([(r, r.name) for r in config.routes])


ROUTES: list[dict[str, Any]] = [
    {"name": "root", "prefix": "/", "upstream": "u"},
    {"name": "users", "prefix": "/users", "upstream": "u"},
    {"name": "user", "path": "/users/{id}", "methods": ["GET", "HEAD"], "upstream": "u"},
    {"name": "me", "path": "/users/me", "upstream": "u"},
    {"name": "user-orders", "path": "/users/{id}/orders/{order}", "upstream": "u"},
    {"name": "api-host", "prefix": "/", "hosts": ["api.example.com"], "upstream": "u"},
    {"name": "wild", "prefix": "/users", "hosts": ["*.example.com"], "upstream": "u"},
    {"name": "v2", "prefix": "/x", "headers": {"x-version": "2"}, "upstream": "u"},
    {"name": "debug", "prefix": "/x", "query": {"debug": "*"}, "upstream": "u"},
    {"name": "v1", "prefix": "/x", "upstream": "u"},
]


@pytest.mark.parametrize(
    ("host", "path", "method", "headers", "query", "route", "captures"),
    [
        ("a", "/users/42", b"GET", [], None, "user", {"id": "42"}),
        ("a", "/users/me", b"GET", [], None, "me", {}),  # literal beats capture
        ("a", "/users", b"GET", [], None, "users", {}),
        ("a", "/users/", b"GET", [], None, "users", {}),
        ("a", "/usersx", b"GET", [], None, "root", {}),  # prefix matches whole segments
        ("a", "/users/42", b"POST", [], None, "users", {}),  # method falls to the prefix
        ("a", "/users/7/orders/9", b"GET", [], None, "user-orders", {"id": "7", "order": "9"}),
        ("a", "/users/a%20b", b"GET", [], None, "user", {"id": "a b"}),
        ("api.example.com", "/users/1", b"GET", [], None, "api-host", {}),  # exact host first
        ("b.example.com", "/users/1", b"GET", [], None, "wild", {}),
        ("b.example.com", "/other", b"GET", [], None, "root", {}),  # falls back to any host
        ("a", "/x/1", b"GET", [(b"x-version", b"2")], None, "v2", {}),
        ("a", "/x/1", b"GET", [(b"x-version", b"3")], None, "v1", {}),
        ("a", "/x/1", b"GET", [], {"debug": ["1"]}, "debug", {}),
        ("a", "/x/1", b"GET", [], {}, "v1", {}),
    ],
)
def test_most_specific_route_wins(
    host: str,
    path: str,
    method: bytes,
    headers: list[tuple[bytes, bytes]],
    query: dict[str, list[str]] | None,
    route: str,
    captures: dict[str, str],
) -> None:
    m = _router(ROUTES).match(host, path, method, headers, query)
    assert (m.value, m.captures) == (route, captures)


def test_404_and_405_with_allow() -> None:
    router = _router(
        [
            {"name": "get", "path": "/things/{id}", "methods": ["GET"], "upstream": "u"},
            {"name": "put", "path": "/things/{id}", "methods": ["PUT"], "upstream": "u"},
        ]
    )
    with pytest.raises(MethodNotAllowed) as info:
        router.match("a", "/things/1", b"DELETE", [])
    assert (b"allow", b"GET, PUT") in info.value.headers
    with pytest.raises(NotFound):
        router.match("a", "/other", b"GET", [])


def test_config_order_breaks_ties() -> None:
    router = _router(
        [
            {"name": "first", "prefix": "/a", "upstream": "u"},
            {"name": "second", "prefix": "/a", "upstream": "u"},
        ]
    )
    assert router.match("h", "/a/b", b"GET", []).value == "first"


def test_ten_thousand_routes_are_indexed_not_scanned() -> None:
    routes = [
        {"name": f"r{i}", "path": f"/svc{i}/items/{{id}}", "upstream": "u"} for i in range(10_000)
    ]
    router = _router(routes)
    # The trie's first level holds one child per service: a match touches one of them.
    assert len(router._any.literal) == 10_000
    m = router.match("h", "/svc9876/items/5", b"GET", [])
    assert (m.value, m.captures) == ("r9876", {"id": "5"})
